"""The process node gives containers what a real kubelet does: volumes at their real
mountPaths, in a mount namespace the host never sees, and in-cluster access to the
API server as the pod's own service account."""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_devcluster.kube import core_v1
from troupe_devcluster.processes import alive
from troupe_devcluster.processnode.mountexec import Mount
from troupe_devcluster.processnode.process import ContainerProcess, CreateContainerError

DEADLINE = 60.0
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

# Exits 0 only if the ConfigMap is at its absolute mountPath, read-only, and the
# subPath and emptyDir mounts behave; each failure has its own exit code.
CONFIG_CHECK = """
import errno, json, sys
base = sys.argv[1]
def writable(path):
    try:
        open(path, "w").close()
    except OSError as error:
        if error.errno == errno.EROFS:
            return False
        raise
    return True
try:
    config = json.load(open(base + "/config.json"))
except FileNotFoundError:
    sys.exit(2)
if config != {"greeting": "hello"}:
    sys.exit(3)
if json.load(open(base + "-single/config.json")) != config:
    sys.exit(4)
if writable(base + "/new"):
    sys.exit(5)
if writable(base + "-ro/new"):
    sys.exit(6)
if not writable(base + "-rw/new"):
    sys.exit(7)
"""

CONFIG_CHECK_FAILURES = {
    2: "config.json is not at the mountPath",
    3: "config.json has the wrong content",
    4: "the subPath mount does not show the file",
    5: "the ConfigMap mount is writable",
    6: "the readOnly emptyDir mount is writable",
    7: "the emptyDir mount is not writable",
}

# Lists the namespace's ConfigMaps with in-cluster config; 13 means the API server
# refused it (403) naming the pod's own service account.
IN_CLUSTER_LIST = """
import sys
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
config.load_incluster_config()
namespace = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
if namespace != sys.argv[1]:
    sys.exit(4)
try:
    items = client.CoreV1Api().list_namespaced_config_map(namespace).items
except ApiException as error:
    me = f"system:serviceaccount:{namespace}:{sys.argv[2]}"
    sys.exit(13 if error.status == 403 and me in str(error.body) else 5)
sys.exit(0 if "troupe-marker" in [item.metadata.name for item in items] else 3)
"""


def _pod(
    name: str,
    command: list[str],
    *,
    volumes: list[dict[str, Any]] | None = None,
    mounts: list[dict[str, Any]] | None = None,
    service_account: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": "python:3.11-slim",
        "command": command,
        "volumeMounts": mounts or [],
        **(extra or {}),
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 2,
        "volumes": volumes or [],
        "containers": [container],
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def _finished(core: Any, namespace: str, name: str) -> Any:
    def done() -> Any:
        pod = core.read_namespaced_pod(name, namespace)
        return pod if pod.status.phase in ("Succeeded", "Failed") else None

    return wait_for(done, DEADLINE, f"pod {name} to finish")


def _exit_code(pod: Any) -> int:
    return int(pod.status.container_statuses[0].state.terminated.exit_code)


def _pid(pod: Any) -> int:
    container_id: str = pod.status.container_statuses[0].container_id
    return int(container_id.removeprefix("process://"))


def _ready(core: Any, namespace: str, name: str) -> Any:
    def ready() -> Any:
        pod = core.read_namespaced_pod(name, namespace)
        conditions = pod.status.conditions or []
        return pod if any(c.type == "Ready" and c.status == "True" for c in conditions) else None

    return wait_for(ready, DEADLINE, f"pod {name} to be ready")


def _mount_points(pid: int | str) -> dict[str, list[str]]:
    """Mount point -> its per-mount options, from a process's mountinfo."""
    points = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        points[fields[4]] = fields[5].split(",")
    return points


@pytest.fixture
def host_dir() -> Iterator[str]:
    """A fresh absolute path under /etc for mountPaths; what the node creates there goes after."""
    base = f"/etc/troupe-test-{uuid.uuid4().hex[:10]}"
    yield base
    for suffix in ("", "-single", "-ro", "-rw"):
        shutil.rmtree(base + suffix, ignore_errors=True)


def test_config_map_is_at_its_absolute_mount_path_read_only(
    api_client: Any, namespace: str, host_dir: str
) -> None:
    core = core_v1(api_client)
    config = json.dumps({"greeting": "hello"})
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "app-config"}, "data": {"config.json": config}}
    )
    pod = _pod(
        "reader",
        ["python", "-c", CONFIG_CHECK, host_dir],
        volumes=[
            {"name": "config", "configMap": {"name": "app-config"}},
            {"name": "scratch", "emptyDir": {}},
        ],
        mounts=[
            {"name": "config", "mountPath": host_dir},
            {
                "name": "config",
                "mountPath": f"{host_dir}-single/config.json",
                "subPath": "config.json",
            },
            {"name": "scratch", "mountPath": f"{host_dir}-ro", "readOnly": True},
            {"name": "scratch", "mountPath": f"{host_dir}-rw"},
        ],
    )
    core.create_namespaced_pod(namespace, pod)

    finished = _finished(core, namespace, "reader")

    code = _exit_code(finished)
    assert code == 0, CONFIG_CHECK_FAILURES.get(code, f"exit code {code}")
    assert finished.status.phase == "Succeeded"
    # The file was mounted, not copied onto the host.
    assert not os.path.exists(f"{host_dir}/config.json")


@pytest.mark.parametrize(
    ("bound", "phase", "code"), [(True, "Succeeded", 0), (False, "Failed", 13)]
)
def test_in_cluster_config_reaches_the_api_server_as_the_pods_service_account(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, bound: bool, phase: str, code: int
) -> None:
    core = core_v1(api_client)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "troupe-marker"}})
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "lister"}})
    if bound:
        # A Role of its own: the aggregated ClusterRole "view" has no rules here, since
        # the controller manager runs no clusterrole-aggregation controller.
        cluster.kubectl(
            "create", "role", "lister", "--verb=list", "--resource=configmaps", "-n", namespace
        )
        cluster.kubectl(
            "create",
            "rolebinding",
            "lister",
            "--role=lister",
            f"--serviceaccount={namespace}:lister",
            "-n",
            namespace,
        )
    pod = _pod(
        "lister", ["python", "-c", IN_CLUSTER_LIST, namespace, "lister"], service_account="lister"
    )
    core.create_namespaced_pod(namespace, pod)

    finished = _finished(core, namespace, "lister")

    assert (finished.status.phase, _exit_code(finished)) == (phase, code)


def test_mounts_live_only_in_the_containers_namespace(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, host_dir: str
) -> None:
    core = core_v1(api_client)
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "app-config"}, "data": {"config.json": "{}"}}
    )
    pod = _pod(
        "sleeper",
        ["sleep", "300"],
        volumes=[{"name": "config", "configMap": {"name": "app-config"}}],
        mounts=[{"name": "config", "mountPath": host_dir}],
        # Ready only if exec probes, too, see the container's mounts.
        extra={
            "readinessProbe": {
                "exec": {"command": ["test", "-f", f"{host_dir}/config.json"]},
                "periodSeconds": 1,
            }
        },
    )
    core.create_namespaced_pod(namespace, pod)
    pid = _pid(_ready(core, namespace, "sleeper"))

    container_mounts = _mount_points(pid)
    assert "ro" in container_mounts[host_dir]
    assert os.path.realpath(SERVICE_ACCOUNT_DIR) in container_mounts
    assert host_dir not in _mount_points("self")
    # mountexec exec'd the container: the pid is `sleep` itself, with the API server's address.
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", b"300"]
    environ = dict(
        entry.split("=", 1)
        for entry in Path(f"/proc/{pid}/environ").read_text().split("\0")
        if "=" in entry
    )
    server = yaml.safe_load(cluster.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    address = f"https://{environ['KUBERNETES_SERVICE_HOST']}:{environ['KUBERNETES_SERVICE_PORT']}"
    assert address == server

    core.delete_namespaced_pod("sleeper", namespace)

    wait_for(lambda: not alive(pid), DEADLINE, f"process {pid} to stop")


def test_a_mount_path_that_cannot_be_made_is_a_create_container_error(
    api_client: Any, namespace: str
) -> None:
    core = core_v1(api_client)
    target = f"/dev/null/troupe-{uuid.uuid4().hex[:8]}"
    pod = _pod(
        "broken",
        ["true"],
        volumes=[{"name": "scratch", "emptyDir": {}}],
        mounts=[{"name": "scratch", "mountPath": target}],
    )
    core.create_namespaced_pod(namespace, pod)

    def waiting() -> Any:
        statuses = core.read_namespaced_pod("broken", namespace).status.container_statuses
        state = statuses[0].state.waiting if statuses else None
        return state if state and state.reason == "CreateContainerError" else None

    state = wait_for(waiting, DEADLINE, "CreateContainerError")
    assert target in state.message
    pod_now = core.read_namespaced_pod("broken", namespace)
    assert pod_now.status.phase == "Pending"
    assert pod_now.status.container_statuses[0].restart_count == 0


def test_a_missing_program_still_fails_the_start_with_its_os_error(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"]}
    with pytest.raises(FileNotFoundError):
        ContainerProcess(["no-such-program-troupe"], env, tmp_path, tmp_path / "log", [])


def test_a_mount_failure_raises_create_container_error_naming_the_path(tmp_path: Path) -> None:
    mount = Mount("v", str(tmp_path), "/dev/null/x", False, str(tmp_path))
    with pytest.raises(CreateContainerError, match="/dev/null/x"):
        ContainerProcess(["true"], {}, tmp_path, tmp_path / "log", [mount])


def test_the_container_pid_is_the_program_not_a_wrapper(tmp_path: Path) -> None:
    process = ContainerProcess(
        [sys.executable, "-c", "import time; time.sleep(30)"], {}, tmp_path, tmp_path / "log", []
    )
    try:
        assert Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")[1] == b"-c"
        assert os.readlink(f"/proc/{process.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    finally:
        process.terminate(0)
        wait_for(lambda: process.poll() is not None, 10, "the process to exit")
