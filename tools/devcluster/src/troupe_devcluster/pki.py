"""The cluster's PKI: a CA, the API server's serving certificate, service-account
signing keys, an admin client certificate in ``system:masters``, and the pair the
API server and the process node's kubelet endpoint use on each other: the node's
serving certificate (for its address) and the API server's kubelet client
certificate (in ``system:masters``, so the endpoint's authorization check passes).

Elliptic-curve keys keep generation in the milliseconds, which matters for a
launcher that makes a fresh PKI on every start.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVING_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
SERVING_IPS = ("127.0.0.1", "10.96.0.1")
ADMIN_USER = "troupe-admin"
ADMIN_GROUP = "system:masters"
# kubeadm's name for the API server's identity towards kubelets.
KUBELET_CLIENT_USER = "kube-apiserver-kubelet-client"
KUBELET_SERVING_IPS = ("127.0.0.1",)
_VALIDITY = datetime.timedelta(days=365)


@dataclass(frozen=True)
class PKIPaths:
    """Where each PEM file of the cluster's PKI lives."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    sa_public: Path
    sa_private: Path
    admin_cert: Path
    admin_key: Path
    kubelet_cert: Path
    kubelet_key: Path
    kubelet_client_cert: Path
    kubelet_client_key: Path

    @classmethod
    def under(cls, directory: Path) -> PKIPaths:
        """Name the files of a PKI kept in ``directory``."""
        return cls(
            ca_cert=directory / "ca.crt",
            ca_key=directory / "ca.key",
            serving_cert=directory / "apiserver.crt",
            serving_key=directory / "apiserver.key",
            sa_public=directory / "sa.pub",
            sa_private=directory / "sa.key",
            admin_cert=directory / "admin.crt",
            admin_key=directory / "admin.key",
            kubelet_cert=directory / "kubelet.crt",
            kubelet_key=directory / "kubelet.key",
            kubelet_client_cert=directory / "apiserver-kubelet-client.crt",
            kubelet_client_key=directory / "apiserver-kubelet-client.key",
        )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
    )


def _leaf(
    subject: x509.Name,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = _key()
    builder = (
        _builder(subject, ca_cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _load_ca(paths: PKIPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def issue_client_certificate(
    paths: PKIPaths, user: str, groups: tuple[str, ...], cert: Path, key: Path
) -> None:
    """Sign a client certificate for ``user`` in ``groups`` with the cluster's CA.

    Tests use it for identities the cluster does not ship, e.g. a user with no rights.
    """
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, user)]
    attributes += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, group) for group in groups]
    leaf, leaf_key = _leaf(x509.Name(attributes), _load_ca(paths), ExtendedKeyUsageOID.CLIENT_AUTH)
    _write({cert: _cert_pem(leaf), key: _key_pem(leaf_key)})


def _write(files: dict[Path, bytes]) -> None:
    for path, content in files.items():
        path.write_bytes(content)
        path.chmod(0o600)


def write_pki(directory: Path, kubelet_names: tuple[str, ...] = ()) -> PKIPaths:
    """Generate a fresh PKI into ``directory`` and return the paths of its files.

    ``kubelet_names`` are the DNS names (the node's name) the kubelet serving
    certificate covers besides its loopback address.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = PKIPaths.under(directory)

    ca_key = _key()
    ca_name = _name("troupe-dev-ca")
    ca_cert = (
        _builder(ca_name, ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    san = x509.SubjectAlternativeName(
        [x509.DNSName(name) for name in SERVING_DNS_NAMES]
        + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVING_IPS]
    )
    serving_cert, serving_key = _leaf(
        _name("kube-apiserver"), (ca_cert, ca_key), ExtendedKeyUsageOID.SERVER_AUTH, san
    )
    admin_cert, admin_key = _leaf(
        _name(ADMIN_USER, ADMIN_GROUP), (ca_cert, ca_key), ExtendedKeyUsageOID.CLIENT_AUTH
    )
    kubelet_san = x509.SubjectAlternativeName(
        [x509.DNSName(name) for name in kubelet_names]
        + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in KUBELET_SERVING_IPS]
    )
    kubelet_cert, kubelet_key = _leaf(
        _name("troupe-process-node"),
        (ca_cert, ca_key),
        ExtendedKeyUsageOID.SERVER_AUTH,
        kubelet_san,
    )
    kubelet_client_cert, kubelet_client_key = _leaf(
        _name(KUBELET_CLIENT_USER, ADMIN_GROUP), (ca_cert, ca_key), ExtendedKeyUsageOID.CLIENT_AUTH
    )
    sa_key = _key()

    files = {
        paths.ca_cert: _cert_pem(ca_cert),
        paths.ca_key: _key_pem(ca_key),
        paths.serving_cert: _cert_pem(serving_cert),
        paths.serving_key: _key_pem(serving_key),
        paths.admin_cert: _cert_pem(admin_cert),
        paths.admin_key: _key_pem(admin_key),
        paths.kubelet_cert: _cert_pem(kubelet_cert),
        paths.kubelet_key: _key_pem(kubelet_key),
        paths.kubelet_client_cert: _cert_pem(kubelet_client_cert),
        paths.kubelet_client_key: _key_pem(kubelet_client_key),
        paths.sa_private: _key_pem(sa_key),
        paths.sa_public: sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }
    _write(files)
    return paths
