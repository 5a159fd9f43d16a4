"""The few Kubernetes API calls the gateway makes, async over httpx: TokenReview,
SubjectAccessReview and Secrets. In a pod: the ServiceAccount's token (re-read when the
kubelet rotates it) and CA; elsewhere the file ``KUBECONFIG`` names (its current context).

The gateway may not import the ``kubernetes`` library (``.importlinter``), and needs four
calls: a client of its own is smaller than the library's import. Every call is bounded by a
deadline (each phase ``timeout``, the whole twice that); an answer the API server gives (a
token not authenticated, an access not allowed) is a ``Review`` with ``ok=False``, and
anything else (no answer, a 5xx, the gateway's own credentials refused) is
``KubeUnavailable``, which callers answer with 503.
Neither a token nor a Secret's data ever reaches a log line or an exception's message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import re
import ssl
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import yaml

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_TIMEOUT_SECONDS = 5.0
# A page of a Secret list, and the most pages followed: a namespace with more API-key
# Secrets than this is a misconfiguration, answered 503 rather than read for minutes.
_PAGE_SIZE = 250
_MAX_PAGES = 40
# DNS-1123 subdomain: what namespaces (labels, a subset) and object names are.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

Extra = tuple[tuple[str, tuple[str, ...]], ...]


class KubeUnavailable(Exception):
    """The API server gave no usable answer; the message names the call, never a secret."""


class KubeConfigError(Exception):
    """The gateway cannot tell how to reach the API server (start-up error)."""


@dataclass(frozen=True)
class Review:
    """A TokenReview's or SubjectAccessReview's answer."""

    ok: bool
    user: str = ""
    groups: tuple[str, ...] = ()
    reason: str = ""
    uid: str = ""
    extra: Extra = ()
    """The TokenReview's ``user.extra``, sorted, handed on to SubjectAccessReviews."""


def is_dns_label(name: str) -> bool:
    """A valid namespace name (DNS-1123 label)."""
    return len(name) <= 63 and _DNS_LABEL.fullmatch(name) is not None


def is_dns_subdomain(name: str) -> bool:
    """A valid namespace or object name: anything else never reaches a URL path."""
    return len(name) <= 253 and _DNS_SUBDOMAIN.fullmatch(name) is not None


class _TokenFile:
    """A bearer token kept in a file that may be replaced under us (projected tokens are
    rotated by the kubelet, through an atomic symlink swap): re-read when it changed."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""

    def token(self, *, reread: bool = False) -> str:
        try:
            info = os.stat(self._path)
            stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
            if reread or stamp != self._stamp:
                self._token = self._path.read_text().strip()
                self._stamp = stamp
        except OSError as error:
            # The last token read stays in use; the API server says whether it still works.
            log.warning("cannot read the token file %s: %s", self._path, error.strerror)
        return self._token


class _StaticToken:
    def __init__(self, token: str) -> None:
        self._token = token

    def token(self, *, reread: bool = False) -> str:
        return self._token


_TokenSource = _TokenFile | _StaticToken


@dataclass(frozen=True)
class Connection:
    """How to reach one API server: what ``from_environment`` decides, before any I/O but
    reading the files it names."""

    server: str
    ca_pem: str | None
    """None: the system's trust store."""
    client_cert_pem: bytes | None = None
    client_key_pem: bytes | None = None
    token: str | None = None
    token_file: Path | None = None


def in_cluster_connection(
    environ: Mapping[str, str], directory: Path = SERVICE_ACCOUNT_DIR
) -> Connection | None:
    """The pod's own ServiceAccount, when ``KUBERNETES_SERVICE_HOST``/``PORT`` are set and
    its token is mounted."""
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "")
    token_file = directory / "token"
    if not host or not port or not token_file.exists():
        return None
    if ":" in host:
        host = f"[{host}]"
    ca = directory / "ca.crt"
    return Connection(
        server=f"https://{host}:{port}",
        ca_pem=ca.read_text() if ca.exists() else None,
        token_file=token_file,
    )


def _named(items: Any, what: str, source: Path) -> dict[str, dict[str, Any]]:
    if items is None:
        return {}
    if not isinstance(items, list):
        raise KubeConfigError(f"{source}: {what} is not a list")
    named: dict[str, dict[str, Any]] = {}
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            body = item.get(what.rstrip("s"))
            named[item["name"]] = body if isinstance(body, dict) else {}
    return named


def _data_or_file(body: dict[str, Any], key: str, base: Path) -> bytes | None:
    data = body.get(f"{key}-data")
    if isinstance(data, str) and data:
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error:
            raise KubeConfigError(f"{key}-data is not base64") from None
    path = body.get(key)
    if isinstance(path, str) and path:
        return (base / path).read_bytes()
    return None


def kubeconfig_connection(paths: Sequence[Path], context: str | None = None) -> Connection:
    """The current (or named) context of the kubeconfig files, merged as kubectl does: the
    first file to name a context, cluster or user wins. Relative paths are relative to the
    file that holds them. Only what a gateway needs: CA, client certificate, token or
    token file; exec plugins, auth providers and skipping TLS verification are refused."""
    clusters: dict[str, tuple[dict[str, Any], Path]] = {}
    users: dict[str, tuple[dict[str, Any], Path]] = {}
    contexts: dict[str, dict[str, Any]] = {}
    current: str | None = context
    for path in paths:
        if not path.exists():
            continue
        try:
            document = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise KubeConfigError(f"{path}: not YAML ({error.__class__.__name__})") from None
        if not isinstance(document, dict):
            continue
        for name, body in _named(document.get("clusters"), "clusters", path).items():
            clusters.setdefault(name, (body, path.parent))
        for name, body in _named(document.get("users"), "users", path).items():
            users.setdefault(name, (body, path.parent))
        for name, body in _named(document.get("contexts"), "contexts", path).items():
            contexts.setdefault(name, body)
        if current is None and isinstance(document.get("current-context"), str):
            current = document["current-context"] or None
    if current is None or current not in contexts:
        raise KubeConfigError(f"no current context in {', '.join(map(str, paths))}")
    chosen = contexts[current]
    cluster_name, user_name = chosen.get("cluster"), chosen.get("user")
    if cluster_name not in clusters:
        raise KubeConfigError(f"context {current!r} names no known cluster")
    cluster, cluster_base = clusters[cluster_name]
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith("https://"):
        raise KubeConfigError(f"cluster {cluster_name!r}: the server must be an https:// URL")
    if cluster.get("insecure-skip-tls-verify"):
        # The gateway hands callers' tokens to this server: it must know whom it talks to.
        raise KubeConfigError(f"cluster {cluster_name!r}: insecure-skip-tls-verify is refused")
    ca = _data_or_file(cluster, "certificate-authority", cluster_base)
    user, user_base = users.get(user_name, ({}, cluster_base)) if user_name else ({}, cluster_base)
    if "exec" in user or "auth-provider" in user:
        raise KubeConfigError(f"user {user_name!r}: exec and auth-provider are not supported")
    token = user.get("token")
    token_file = user.get("tokenFile")
    return Connection(
        server=server.rstrip("/"),
        ca_pem=ca.decode() if ca is not None else None,
        client_cert_pem=_data_or_file(user, "client-certificate", user_base),
        client_key_pem=_data_or_file(user, "client-key", user_base),
        token=token if isinstance(token, str) and token else None,
        token_file=user_base / token_file if isinstance(token_file, str) and token_file else None,
    )


def environment_connection(environ: Mapping[str, str]) -> Connection:
    """``KUBECONFIG`` when set; else the pod's ServiceAccount; else ``~/.kube/config``."""
    listed = environ.get("KUBECONFIG", "")
    if listed:
        return kubeconfig_connection([Path(p) for p in listed.split(os.pathsep) if p])
    pod = in_cluster_connection(environ)
    if pod is not None:
        return pod
    return kubeconfig_connection([Path.home() / ".kube" / "config"])


def _ssl_context(connection: Connection) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if connection.ca_pem is not None:
        context.load_verify_locations(cadata=connection.ca_pem)
    if connection.client_cert_pem is not None:
        if connection.client_key_pem is None:
            raise KubeConfigError("a client certificate without its key")
        # ssl loads a certificate chain from files only: a private directory, gone at once.
        with tempfile.TemporaryDirectory(prefix="troupe-gateway-") as directory:
            cert, key = Path(directory) / "client.crt", Path(directory) / "client.key"
            for path, content in (
                (cert, connection.client_cert_pem),
                (key, connection.client_key_pem),
            ):
                path.touch(mode=0o600)
                path.write_bytes(content)
            context.load_cert_chain(cert, key)
    return context


def _token_source(connection: Connection) -> _TokenSource | None:
    if connection.token_file is not None:
        return _TokenFile(connection.token_file)
    if connection.token is not None:
        return _StaticToken(connection.token)
    return None


def _obj(value: Any) -> dict[str, Any]:
    """A JSON object of the answer, or an empty one: a malformed answer is no answer."""
    return value if isinstance(value, dict) else {}


def _str_list(value: Any) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _extra(value: Any) -> Extra:
    if not isinstance(value, dict):
        return ()
    return tuple(sorted((k, _str_list(v)) for k, v in value.items() if isinstance(k, str)))


def _decoded(data: Any) -> dict[str, bytes]:
    decoded: dict[str, bytes] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and isinstance(value, str):
                try:
                    decoded[key] = base64.b64decode(value, validate=True)
                except binascii.Error:
                    continue
    return decoded


class Kube:
    """One API server, one pooled HTTP/1.1 client; ``aclose`` when the gateway stops."""

    def __init__(
        self,
        connection: Connection,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._timeout = timeout
        self._token = _token_source(connection)
        self._client = httpx.AsyncClient(
            base_url=connection.server,
            verify=_ssl_context(connection),
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
            headers={"Accept": "application/json", "User-Agent": "troupe-gateway"},
            # Callers' tokens go to the API server and nowhere else: no proxy from the env.
            trust_env=False,
            transport=transport,
        )

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, *, timeout: float = DEFAULT_TIMEOUT_SECONDS
    ) -> Kube:
        """Raises ``KubeConfigError`` when nothing says how to reach the API server."""
        try:
            connection = environment_connection(os.environ if environ is None else environ)
        except OSError as error:
            raise KubeConfigError(f"{error.filename}: {error.strerror}") from None
        return cls(connection, timeout=timeout)

    async def _request(
        self, method: str, path: str, *, body: dict[str, Any] | None = None, params: Any = None
    ) -> dict[str, Any] | None:
        """The answer's JSON object; None for a 404. One retry, with the token re-read, when
        the API server refuses the gateway's own token (it may just have been rotated)."""
        for attempt in range(2):
            headers: dict[str, str] = {}
            if self._token is not None:
                token = self._token.token(reread=attempt > 0)
                if token:
                    headers["Authorization"] = f"Bearer {token}"
            try:
                # httpx's own per-phase timeouts fire first and close the socket; this
                # total deadline only stops an answer dripped in slowly.
                async with asyncio.timeout(2 * self._timeout):
                    response = await self._client.request(
                        method, path, json=body, params=params, headers=headers
                    )
            except (httpx.HTTPError, TimeoutError, ssl.SSLError, OSError) as error:
                raise KubeUnavailable(f"{method} {path}: {error.__class__.__name__}") from None
            if response.status_code == 401 and attempt == 0 and self._token is not None:
                continue
            if response.status_code == 404:
                return None
            if response.status_code >= 300:
                raise KubeUnavailable(f"{method} {path}: HTTP {response.status_code}")
            try:
                answer = response.json()
            except ValueError:
                raise KubeUnavailable(f"{method} {path}: not JSON") from None
            if not isinstance(answer, dict):
                raise KubeUnavailable(f"{method} {path}: not a JSON object")
            return answer
        raise KubeUnavailable(f"{method} {path}: the gateway's credentials were refused (401)")

    async def token_review(self, token: str, audiences: tuple[str, ...] = ()) -> Review:
        """Who the token says the caller is, as the API server's authenticators judge it."""
        spec: dict[str, Any] = {"token": token}
        if audiences:
            spec["audiences"] = list(audiences)
        answer = await self._request(
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec},
        )
        status = _obj(_obj(answer).get("status"))
        user = _obj(status.get("user"))
        username = user.get("username")
        if status.get("authenticated") is not True or not isinstance(username, str) or not username:
            error = status.get("error")
            # The authenticators' error may quote a token's claims: only its kind is kept.
            return Review(ok=False, reason="not authenticated" if not error else "token rejected")
        uid = user.get("uid")
        return Review(
            ok=True,
            user=username,
            groups=_str_list(user.get("groups")),
            uid=uid if isinstance(uid, str) else "",
            extra=_extra(user.get("extra")),
        )

    async def access_review(
        self,
        user: str,
        groups: tuple[str, ...],
        *,
        namespace: str,
        verb: str,
        group: str,
        resource: str,
        name: str,
        uid: str = "",
        extra: Extra = (),
    ) -> Review:
        """May ``user`` do ``verb`` on the object? ``reason`` is the authorizer's own."""
        spec: dict[str, Any] = {
            "user": user,
            "groups": list(groups),
            "resourceAttributes": {
                "namespace": namespace,
                "verb": verb,
                "group": group,
                "resource": resource,
                "name": name,
            },
        }
        if uid:
            spec["uid"] = uid
        if extra:
            spec["extra"] = {k: list(v) for k, v in extra}
        answer = await self._request(
            "POST",
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            body={
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": spec,
            },
        )
        status = _obj(_obj(answer).get("status"))
        reason = status.get("reason")
        evaluation = status.get("evaluationError")
        said = "; ".join(s for s in (reason, evaluation) if isinstance(s, str) and s)
        return Review(
            ok=status.get("allowed") is True and status.get("denied") is not True,
            user=user,
            groups=groups,
            reason=said,
        )

    async def secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """The Secret's data, decoded; None when there is none."""
        if not is_dns_label(namespace) or not is_dns_subdomain(name):
            return None
        answer = await self._request(
            "GET", f"/api/v1/namespaces/{quote(namespace, safe='')}/secrets/{quote(name, safe='')}"
        )
        return None if answer is None else _decoded(answer.get("data"))

    async def secrets(
        self, namespace: str, label_selector: str
    ) -> list[tuple[str, dict[str, str], dict[str, bytes]]]:
        """``(name, annotations, data)`` of each Secret the selector picks."""
        if not is_dns_label(namespace):
            return []
        found: list[tuple[str, dict[str, str], dict[str, bytes]]] = []
        params: dict[str, str | int] = {"labelSelector": label_selector, "limit": _PAGE_SIZE}
        for _ in range(_MAX_PAGES):
            answer = await self._request(
                "GET", f"/api/v1/namespaces/{quote(namespace, safe='')}/secrets", params=params
            )
            if answer is None:
                return found
            items = answer.get("items")
            for item in items if isinstance(items, list) else []:
                metadata = _obj(_obj(item).get("metadata"))
                name = metadata.get("name")
                if not isinstance(name, str):
                    continue
                annotations = _obj(metadata.get("annotations"))
                found.append(
                    (
                        name,
                        {k: v for k, v in annotations.items() if isinstance(v, str)},
                        _decoded(_obj(item).get("data")),
                    )
                )
            more = _obj(answer.get("metadata")).get("continue")
            if not isinstance(more, str) or not more:
                return found
            params = {**params, "continue": more}
        raise KubeUnavailable(f"more than {_PAGE_SIZE * _MAX_PAGES} Secrets in {namespace}")

    async def aclose(self) -> None:
        await self._client.aclose()
