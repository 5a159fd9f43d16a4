"""The launcher's pure parts: PKI, component flags, kubeconfig and node builders."""

from __future__ import annotations

import base64
import ipaddress
import json
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from troupe_devcluster import components, launcher
from troupe_devcluster.layout import Layout, Ports, allocate_nats_nodes
from troupe_devcluster.pki import ADMIN_GROUP, KUBELET_CLIENT_USER, write_pki


def _layout(tmp_path: Path) -> Layout:
    return Layout(root=tmp_path, ports=Ports.allocate())


def _flag(argv: list[str], name: str) -> str:
    values = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name} given {len(values)} times"
    return values[0]


def test_serving_certificate_covers_loopback_and_in_cluster_names(tmp_path: Path) -> None:
    paths = write_pki(tmp_path)
    cert = x509.load_pem_x509_certificate(paths.serving_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert {"localhost", "kubernetes.default.svc"} <= set(san.get_values_for_type(x509.DNSName))


def test_admin_certificate_is_a_client_certificate_in_system_masters(tmp_path: Path) -> None:
    paths = write_pki(tmp_path)
    cert = x509.load_pem_x509_certificate(paths.admin_cert.read_bytes())
    organizations = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    assert [org.value for org in organizations] == [ADMIN_GROUP]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_certificates_are_signed_by_the_generated_ca(tmp_path: Path) -> None:
    paths = write_pki(tmp_path)
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    for leaf_path in (paths.serving_cert, paths.admin_cert):
        x509.load_pem_x509_certificate(leaf_path.read_bytes()).verify_directly_issued_by(ca)


def test_kubelet_serving_certificate_covers_the_node_address_and_name(tmp_path: Path) -> None:
    paths = write_pki(tmp_path, kubelet_names=("process-node",))
    cert = x509.load_pem_x509_certificate(paths.kubelet_cert.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(paths.ca_cert.read_bytes()))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["process-node"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_the_apiserver_reaches_kubelets_with_a_client_certificate_and_checks_theirs(
    tmp_path: Path,
) -> None:
    layout = _layout(tmp_path)
    paths = write_pki(layout.pki.ca_cert.parent)
    client = x509.load_pem_x509_certificate(paths.kubelet_client_cert.read_bytes())
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        KUBELET_CLIENT_USER
    )
    argv = components.kube_apiserver(tmp_path, layout).argv
    assert _flag(argv, "kubelet-client-certificate") == str(paths.kubelet_client_cert)
    assert _flag(argv, "kubelet-client-key") == str(paths.kubelet_client_key)
    assert _flag(argv, "kubelet-certificate-authority") == str(paths.ca_cert)
    assert _flag(argv, "kubelet-preferred-address-types").startswith("InternalIP")
    node = components.process_node(layout).argv
    assert _flag(node, "kubelet-port") == str(layout.ports.kubelet)
    assert _flag(node, "client-ca-file") == str(paths.ca_cert)


def test_kubeconfig_inlines_the_ca_and_the_admin_credentials(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    write_pki(layout.pki.ca_cert.parent)
    kubeconfig = launcher.build_kubeconfig(layout)
    cluster = kubeconfig["clusters"][0]["cluster"]
    user = kubeconfig["users"][0]["user"]
    assert cluster["server"] == f"https://127.0.0.1:{layout.ports.apiserver}"
    assert (
        base64.b64decode(cluster["certificate-authority-data"]) == layout.pki.ca_cert.read_bytes()
    )
    assert base64.b64decode(user["client-key-data"]) == layout.pki.admin_key.read_bytes()


def test_apiserver_authorizes_with_rbac_and_admits_with_pod_security(tmp_path: Path) -> None:
    argv = components.kube_apiserver(tmp_path, _layout(tmp_path)).argv
    assert "RBAC" in _flag(argv, "authorization-mode").split(",")
    assert "PodSecurity" in _flag(argv, "enable-admission-plugins").split(",")
    assert _flag(argv, "bind-address") == "127.0.0.1"


def test_controller_manager_runs_the_controllers_the_harness_relies_on(tmp_path: Path) -> None:
    argv = components.kube_controller_manager(tmp_path, _layout(tmp_path)).argv
    controllers = set(_flag(argv, "controllers").split(","))
    assert {
        "garbage-collector-controller",
        "deployment-controller",
        "replicaset-controller",
        "namespace-controller",
        "serviceaccount-token-controller",
    } <= controllers


def test_kwok_node_carries_the_taint_that_keeps_ordinary_pods_away() -> None:
    node = launcher.build_kwok_node(0)
    assert node["metadata"]["labels"]["type"] == "kwok"
    assert node["spec"]["taints"] == [launcher.KWOK_TAINT]
    assert f"--manage-nodes-with-label-selector={components.KWOK_NODE_LABEL}" in (
        components.kwok(Path("/bin"), _layout(Path("/tmp"))).argv
    )


def test_allocated_ports_are_distinct() -> None:
    ports = Ports.allocate()
    values = [getattr(ports, name) for name in Ports.__dataclass_fields__]
    assert len(set(values)) == len(values)


def test_layout_survives_the_state_file_round_trip(tmp_path: Path) -> None:
    layout = Layout(root=tmp_path, ports=Ports.allocate(), pids={"etcd": 42})
    assert Layout.from_json(layout.to_json()) == layout


def test_env_lines_export_kubeconfig_and_nats_url(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    lines = launcher.env_lines(layout).splitlines()
    assert lines == [
        f"export KUBECONFIG={tmp_path / 'kubeconfig'}",
        f"export NATS_URL=nats://127.0.0.1:{layout.ports.nats}",
    ]


def test_shutdown_order_stops_every_component_the_launcher_starts(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    bin_dir = tmp_path / "bin"
    started = {
        components.etcd(bin_dir, layout).name,
        components.kube_apiserver(bin_dir, layout).name,
        components.kube_controller_manager(bin_dir, layout).name,
        components.kube_scheduler(bin_dir, layout).name,
        components.kwok(bin_dir, layout).name,
        components.nats_server(layout).name,
        components.process_node(layout).name,
    }
    ordered = [name for group in launcher.SHUTDOWN_ORDER for name in group]
    assert sorted(ordered) == sorted(started)


def test_a_state_file_from_before_the_kubelet_port_still_loads(tmp_path: Path) -> None:
    """`down` must still stop a cluster started by an older checkout."""
    layout = Layout(root=tmp_path, ports=Ports.allocate(), pids={"etcd": 42})
    data = json.loads(layout.to_json())
    del data["ports"]["kubelet"]
    loaded = Layout.from_json(json.dumps(data))
    assert loaded.pids == {"etcd": 42}
    assert loaded.ports.kubelet == 0


def _cluster_layout(tmp_path: Path) -> Layout:
    ports = Ports.allocate()
    return Layout(root=tmp_path, ports=ports, nats_nodes=allocate_nats_nodes(3, ports))


def test_a_nats_cluster_url_names_every_server(tmp_path: Path) -> None:
    layout = _cluster_layout(tmp_path)
    urls = layout.nats_url.split(",")
    assert urls == [f"nats://127.0.0.1:{node.client}" for node in layout.nats_nodes]
    assert urls[0] == f"nats://127.0.0.1:{layout.ports.nats}"
    ports = [p for node in layout.nats_nodes for p in (node.client, node.monitor, node.cluster)]
    assert len(set(ports)) == 9
    # Only the first server's pair is among the cluster's other ports.
    shared = set(ports) & set(vars(layout.ports).values())
    assert shared == {layout.ports.nats, layout.ports.nats_monitor}
    assert launcher.env_lines(layout).splitlines()[1:] == [
        f"export NATS_URL={layout.nats_url}",
        "export TROUPE_NATS_REPLICAS=3",
    ]


def test_each_cluster_server_routes_to_the_others_and_stores_apart(tmp_path: Path) -> None:
    layout = _cluster_layout(tmp_path)
    servers = components.nats_servers(layout)
    assert [s.name for s in servers] == ["nats-server-0", "nats-server-1", "nats-server-2"]
    for index, server in enumerate(servers):
        argv = server.argv
        own = layout.nats_nodes[index]
        routes = argv[argv.index("--routes") + 1].split(",")
        assert sorted(routes) == sorted(n.route for n in layout.nats_nodes if n != own)
        assert argv[argv.index("--cluster") + 1] == own.route
        assert argv[argv.index("-sd") + 1] == str(tmp_path / f"jetstream-{index}")
        assert argv[argv.index("--cluster_name") + 1] == components.NATS_CLUSTER_NAME
    assert len({s.health_url for s in servers}) == 3


def test_a_cluster_layout_survives_the_state_file_round_trip(tmp_path: Path) -> None:
    layout = _cluster_layout(tmp_path)
    assert Layout.from_json(layout.to_json()) == layout
    assert components.nats_servers(_layout(tmp_path))[0].name == "nats-server"
