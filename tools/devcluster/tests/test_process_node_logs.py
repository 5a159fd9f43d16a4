"""`kubectl logs` and termination messages against pods on the process node, through the
real API server, which reaches the node's kubelet endpoint with the cluster's PKI."""

from __future__ import annotations

import http.client
import json
import queue
import ssl
import subprocess
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from troupe_devcluster.components import venv_bin
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_devcluster.kube import core_v1
from troupe_devcluster.layout import PROCESS_NODE_NAME
from troupe_devcluster.pki import PKIPaths, issue_client_certificate, write_pki

DEADLINE = 60.0

# Prints its run number (counted in a file), fails the first run and idles on later ones.
RESTARTER = """
import pathlib, sys, time
counter = pathlib.Path(sys.argv[1])
run = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(run))
print(f"run {run}", flush=True)
if run == 1:
    sys.exit(1)
time.sleep(300)
"""

# Says it is ready, waits for the go file, then says it went on, and ends.
WAITER = """
import os, sys, time
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
print("after the go", flush=True)
"""


def _pod(name: str, containers: list[dict[str, Any]], restart: str = "Never") -> dict[str, Any]:
    for container in containers:
        container.setdefault("image", "python:3.11-slim")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 1,
            "containers": containers,
        },
    }


def _python(name: str, code: str, *args: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "command": ["python", "-u", "-c", code, *args], **extra}


def _status(core: Any, namespace: str, name: str, container: str = "main") -> Any:
    statuses = core.read_namespaced_pod(name, namespace).status.container_statuses or []
    return next((status for status in statuses if status.name == container), None)


def _logs(cluster: ClusterEndpoints, namespace: str, *args: str) -> str:
    return cluster.kubectl("logs", "-n", namespace, *args, check=False)


def test_logs_of_a_running_pod_by_container_and_tail(
    cluster: ClusterEndpoints, api_client: Any, namespace: str
) -> None:
    core = core_v1(api_client)
    talker = "for i in range(1, 6): print(f'line {i}')\nimport time; time.sleep(300)"
    pod = _pod("talker", [_python("main", talker), _python("side", "print('from the side')")])
    core.create_namespaced_pod(namespace, pod)

    def five_lines() -> str | None:
        out = _logs(cluster, namespace, "talker", "-c", "main")
        return out if out.endswith("line 5\n") else None

    shown = wait_for(five_lines, DEADLINE, "the running container's five lines")

    assert shown == "line 1\nline 2\nline 3\nline 4\nline 5\n"
    assert _logs(cluster, namespace, "talker", "-c", "main", "--tail=2") == "line 4\nline 5\n"
    assert _logs(cluster, namespace, "talker", "-c", "side") == "from the side\n"
    assert _logs(cluster, namespace, "talker", "-c", "main", "--limit-bytes=9") == "line 1\nli"
    stamped = _logs(cluster, namespace, "talker", "-c", "main", "--tail=1", "--timestamps")
    assert stamped.endswith("Z line 5\n")
    later = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert _logs(cluster, namespace, "talker", "-c", "main", f"--since-time={later}") == ""
    assert _logs(cluster, namespace, "talker", "-c", "main", "--since=1h") == shown


def test_previous_shows_the_instance_before_the_restart(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, tmp_path: Path
) -> None:
    core = core_v1(api_client)
    pod = _pod("restarter", [_python("main", RESTARTER, str(tmp_path / "runs"))], "Always")
    core.create_namespaced_pod(namespace, pod)

    def restarted() -> bool:
        status = _status(core, namespace, "restarter")
        return bool(status and status.restart_count == 1 and status.state.running)

    wait_for(restarted, DEADLINE, "the container's second run")

    wait_for(
        lambda: _logs(cluster, namespace, "restarter") == "run 2\n", DEADLINE, "the second run"
    )
    assert _logs(cluster, namespace, "restarter", "--previous") == "run 1\n"


def test_follow_receives_a_line_written_after_it_started(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, tmp_path: Path
) -> None:
    core = core_v1(api_client)
    go = tmp_path / "go"
    core.create_namespaced_pod(namespace, _pod("waiter", [_python("main", WAITER, str(go))]))
    wait_for(lambda: _logs(cluster, namespace, "waiter") == "ready\n", DEADLINE, "the ready line")
    kubectl = [str(venv_bin() / "kubectl"), f"--kubeconfig={cluster.kubeconfig}"]
    follow = subprocess.Popen(
        [*kubectl, "logs", "-f", "-n", namespace, "waiter"],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert follow.stdout is not None
    stdout = follow.stdout

    def read() -> None:
        for line in stdout:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert lines.get(timeout=DEADLINE) == "ready\n"
        go.touch()

        assert lines.get(timeout=DEADLINE) == "after the go\n"
        # The container ended, and with it the stream.
        assert follow.wait(DEADLINE) == 0
    finally:
        follow.kill()
        follow.wait()
        reader.join(DEADLINE)
        stdout.close()


def test_kubectl_logs_explains_a_container_that_has_not_started(
    cluster: ClusterEndpoints, api_client: Any, namespace: str
) -> None:
    core = core_v1(api_client)
    container = _python("main", "print('never')")
    container["env"] = [
        {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "missing", "key": "k"}}}
    ]
    core.create_namespaced_pod(namespace, _pod("blocked", [container]))
    wait_for(
        lambda: (
            "is waiting to start: CreateContainerConfigError"
            in _logs(cluster, namespace, "blocked")
        ),
        DEADLINE,
        "kubectl logs to say why there is no log",
    )


def _kubelet_port(cluster: ClusterEndpoints) -> int:
    node = json.loads(cluster.kubectl("get", "node", PROCESS_NODE_NAME, "-o", "json"))
    port = int(node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"])
    assert port > 0
    assert {"type": "InternalIP", "address": "127.0.0.1"} in node["status"]["addresses"]
    return port


def _get(port: int, context: ssl.SSLContext, path: str) -> tuple[int, str]:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def _client(pki: PKIPaths, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def test_the_kubelet_endpoint_lets_in_only_authorized_client_certificates(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, tmp_path: Path
) -> None:
    core = core_v1(api_client)
    core.create_namespaced_pod(namespace, _pod("hello", [_python("main", "print('hello')")]))
    pki = PKIPaths.under(cluster.kubeconfig.parent / "pki")
    port = _kubelet_port(cluster)
    path = f"/containerLogs/{namespace}/hello/main"
    apiserver = _client(pki, pki.kubelet_client_cert, pki.kubelet_client_key)
    wait_for(lambda: _get(port, apiserver, path) == (200, "hello\n"), DEADLINE, "the log")

    assert _get(port, _client(pki), path) == (401, "Unauthorized")

    nobody = f"nobody-{uuid.uuid4().hex[:6]}"
    issue_client_certificate(pki, nobody, (), tmp_path / "nobody.crt", tmp_path / "nobody.key")
    status, body = _get(port, _client(pki, tmp_path / "nobody.crt", tmp_path / "nobody.key"), path)
    assert (status, f"user={nobody}" in body) == (403, True)

    # A certificate another CA signed does not get past the handshake.
    other = write_pki(tmp_path / "stranger")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _get(port, _client(pki, other.admin_cert, other.admin_key), path)


def _terminated(core: Any, namespace: str, name: str) -> Any:
    def done() -> Any:
        status = _status(core, namespace, name)
        return status.state.terminated if status and status.state.terminated else None

    return wait_for(done, DEADLINE, f"{name} to terminate")


FAILING_OUTPUT = "for i in range(100): print(f'line {i:03d} ' + '.' * 30)\nraise SystemExit(3)"
# The kubelet's fallback: the last 80 lines, at most their last 2048 bytes.
FALLBACK = "".join(f"line {i:03d} {'.' * 30}\n" for i in range(20, 100))[-2048:]
WRITE_AND_FAIL = "print('output')\nopen('/dev/termination-log', 'w').write('bye')\nexit(2)"


@pytest.mark.parametrize(
    ("policy", "code", "exit_code", "reason", "message"),
    [
        # The file at terminationMessagePath wins under either policy.
        ("File", WRITE_AND_FAIL, 2, "Error", "bye"),
        ("FallbackToLogsOnError", WRITE_AND_FAIL, 2, "Error", "bye"),
        # An empty file: the log's tail on failure, under the fallback policy only.
        ("FallbackToLogsOnError", FAILING_OUTPUT, 3, "Error", FALLBACK),
        ("File", FAILING_OUTPUT, 3, "Error", None),
        ("FallbackToLogsOnError", "print('fine')", 0, "Completed", None),
    ],
)
def test_a_terminated_container_reports_its_termination_message(
    api_client: Any,
    namespace: str,
    policy: str,
    code: str,
    exit_code: int,
    reason: str,
    message: str | None,
) -> None:
    core = core_v1(api_client)
    container = _python("main", code, terminationMessagePolicy=policy)
    core.create_namespaced_pod(namespace, _pod("ender", [container]))

    terminated = _terminated(core, namespace, "ender")

    assert (terminated.exit_code, terminated.reason, terminated.message) == (
        exit_code,
        reason,
        message,
    )


def test_a_crash_looping_container_keeps_its_message_in_the_last_state(
    api_client: Any, namespace: str
) -> None:
    core = core_v1(api_client)
    code = "print('cannot parse the schema')\nraise SystemExit(1)"
    container = _python("main", code, terminationMessagePolicy="FallbackToLogsOnError")
    core.create_namespaced_pod(namespace, _pod("crasher", [container], "Always"))

    def backing_off() -> Any:
        status = _status(core, namespace, "crasher")
        waiting = status.state.waiting if status else None
        return status if waiting and waiting.reason == "CrashLoopBackOff" else None

    status = wait_for(backing_off, DEADLINE, "CrashLoopBackOff")

    last = status.last_state.terminated
    assert (last.exit_code, last.reason, last.message) == (1, "Error", "cannot parse the schema\n")
    assert "back-off" in status.state.waiting.message
