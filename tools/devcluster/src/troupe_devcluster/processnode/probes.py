"""Startup, liveness and readiness probes, run against a container's process.

``httpGet`` and ``tcpSocket`` connect to the pod IP (or the probe's ``host``);
``exec`` runs the command as a local process in the pod dir with the
container's env (through ``exec_prefix``, in the container's mount
namespace). ``grpc`` probes always fail with a message saying so.
The threshold bookkeeping (``ProbeTracker``) is pure; ``Prober`` is the
thread that runs one probe of one container instance on its schedule.
"""

from __future__ import annotations

import http.client
import logging
import os
import signal
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from troupe_devcluster.processnode.sources import JSON

log = logging.getLogger(__name__)

USER_AGENT = "kube-probe/1.36"
MAX_MESSAGE = 200
# How often a gated probe checks whether the startup probe has passed yet.
GATE_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class ProbeSpec:
    """A probe's timing and action, with the Kubernetes defaults filled in."""

    action: JSON
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3

    @classmethod
    def parse(cls, probe: JSON) -> ProbeSpec:
        action = {
            key: value
            for key, value in probe.items()
            if key in ("httpGet", "tcpSocket", "exec", "grpc")
        }
        return cls(
            action=action,
            initial_delay=float(probe.get("initialDelaySeconds", 0)),
            period=float(probe.get("periodSeconds", 10)),
            timeout=float(probe.get("timeoutSeconds", 1)),
            success_threshold=int(probe.get("successThreshold", 1)),
            failure_threshold=int(probe.get("failureThreshold", 3)),
        )


class ProbeTracker:
    """Turns single probe outcomes into the probe's result via its thresholds.

    The result flips to success after ``success_threshold`` consecutive
    successes and to failure after ``failure_threshold`` consecutive failures.
    """

    def __init__(self, spec: ProbeSpec, initial: bool) -> None:
        self._spec = spec
        self._lock = threading.Lock()
        self._result = initial
        self._successes = 0
        self._failures = 0

    @property
    def result(self) -> bool:
        with self._lock:
            return self._result

    @property
    def failing(self) -> bool:
        """Whether the latest ``failure_threshold`` outcomes were all failures."""
        with self._lock:
            return self._failures >= self._spec.failure_threshold

    def observe(self, success: bool) -> bool:
        """Record one outcome; return whether the result changed."""
        with self._lock:
            before = self._result
            if success:
                self._successes += 1
                self._failures = 0
                if self._successes >= self._spec.success_threshold:
                    self._result = True
            else:
                self._failures += 1
                self._successes = 0
                if self._failures >= self._spec.failure_threshold:
                    self._result = False
            return self._result != before


@dataclass(frozen=True)
class ProbeTarget:
    """What a probe of one container instance needs to reach it."""

    pod_ip: str
    ports: Mapping[str, int]
    env: Mapping[str, str]
    cwd: Path
    # Put before an exec probe's command, say to run it where the container's mounts are.
    exec_prefix: tuple[str, ...] = ()


def container_ports(container: JSON) -> dict[str, int]:
    """Named ports of a container, for probes that name their port."""
    return {
        port["name"]: int(port["containerPort"])
        for port in container.get("ports") or []
        if port.get("name")
    }


def resolve_port(port: int | str, ports: Mapping[str, int]) -> int:
    """An IntOrString probe port: a number, a numeric string or a named container port."""
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    if port in ports:
        return ports[port]
    raise ValueError(f'no container port named "{port}"')


def _http_get(action: JSON, target: ProbeTarget, timeout: float) -> tuple[bool, str]:
    host = action.get("host") or target.pod_ip
    port = resolve_port(action["port"], target.ports)
    connection: http.client.HTTPConnection
    if action.get("scheme", "HTTP").upper() == "HTTPS":
        # Like the kubelet, HTTPS probes do not verify the certificate.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"User-Agent": USER_AGENT, "Accept": "*/*"}
    headers.update({header["name"]: header["value"] for header in action.get("httpHeaders") or []})
    try:
        connection.request("GET", action.get("path") or "/", headers=headers)
        response = connection.getresponse()
        response.read(MAX_MESSAGE)
    finally:
        connection.close()
    return 200 <= response.status < 400, f"HTTP probe returned {response.status}"


def _tcp_socket(action: JSON, target: ProbeTarget, timeout: float) -> tuple[bool, str]:
    host = action.get("host") or target.pod_ip
    port = resolve_port(action["port"], target.ports)
    with socket.create_connection((host, port), timeout=timeout):
        return True, f"connected to {host}:{port}"


def _exec(action: JSON, target: ProbeTarget, timeout: float) -> tuple[bool, str]:
    command = action.get("command") or []
    if not command:
        return False, "exec probe has no command"
    process = subprocess.Popen(
        [*target.exec_prefix, *command],
        env=dict(target.env),
        cwd=target.cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return False, f"command timed out after {timeout:g}s"
    message = output.decode(errors="replace").strip()[:MAX_MESSAGE]
    return process.returncode == 0, message or f"exit code {process.returncode}"


def run_probe(action: JSON, target: ProbeTarget, timeout: float) -> tuple[bool, str]:
    """Run one probe action once: (success, message). Never raises."""
    try:
        if "httpGet" in action:
            return _http_get(action["httpGet"], target, timeout)
        if "tcpSocket" in action:
            return _tcp_socket(action["tcpSocket"], target, timeout)
        if "exec" in action:
            return _exec(action["exec"], target, timeout)
        if "grpc" in action:
            return False, "grpc probes are not supported by the process node"
        return False, "probe has no action"
    except (OSError, ValueError, http.client.HTTPException) as error:
        return False, f"{type(error).__name__}: {error}"


class Prober:
    """Runs one probe of one container instance, in a thread of its own, until stopped.

    ``gate`` holds the probe back (without counting) while it returns False:
    liveness and readiness wait for the startup probe. ``on_change`` is
    called whenever the tracker's result flips. A prober ``until_success``
    (the startup probe) ends once its result is success.
    """

    def __init__(
        self,
        name: str,
        spec: ProbeSpec,
        tracker: ProbeTracker,
        target: ProbeTarget,
        on_change: Callable[[], None],
        gate: Callable[[], bool] = lambda: True,
        until_success: bool = False,
    ) -> None:
        self.name = name
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._spec = spec
        self._tracker = tracker
        self._target = target
        self._on_change = on_change
        self._gate = gate
        self._until_success = until_success
        self._stopped = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        if self._stopped.wait(self._spec.initial_delay):
            return
        while True:
            if not self._gate():
                if self._stopped.wait(GATE_POLL_SECONDS):
                    return
                continue
            success, message = run_probe(self._spec.action, self._target, self._spec.timeout)
            if self._stopped.is_set():
                return
            if self._tracker.observe(success):
                log.info("%s: %s (%s)", self.name, "passing" if success else "failing", message)
                self._on_change()
            if self._until_success and self._tracker.result:
                return
            if self._stopped.wait(self._spec.period):
                return
