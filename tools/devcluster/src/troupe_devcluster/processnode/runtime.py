"""Runs one pod: its containers as local processes, their probes, restarts and status.

The contract for container authors (there are no images; the only namespace
is a mount namespace per container, where the node may make one):

- argv is ``command`` + ``args`` with ``$(VAR)`` expanded (``args`` alone when
  there is no ``command``; neither is a config error). A bare program name is
  looked up on PATH, which starts with the node Python's bin directory.
- Each pod gets its own loopback address from the node's range (127.1.0.1,
  127.1.0.2, ...): bind to ``$POD_IP`` (also ``status.podIP``), never to
  0.0.0.0, or two pods on one port collide. ``hostNetwork`` pods get 127.0.0.1.
- cwd is the pod dir; volumes and mounts are described in ``volumes``. With
  ``NodeContext.real_mounts`` each container runs in a mount namespace of its
  own with its volumeMounts bind-mounted at their mountPaths (``mountexec``),
  the service account's token at /var/run/secrets/kubernetes.io/serviceaccount
  among them; a mount that cannot be made is ``CreateContainerError``.
- The environment is ``env.base_env`` (with ``KUBERNETES_SERVICE_HOST`` and
  ``_PORT`` naming the real API server) + ``TROUPE_MOUNT_ROOT`` +
  ``TROUPE_VOLUME_*`` + the container's ``envFrom`` and ``env``.
- stdout and stderr are kept per instance in the CRI log format
  (``logs``), served by the node's kubelet endpoint to ``kubectl logs``, and
  appended as they are to ``<pod dir>/<container>.log``.
- ``terminationMessagePath`` (default /dev/termination-log) is a fresh file
  per instance, ``<pod dir>/termination/<container>``, bind-mounted at that
  path with real mounts and named by ``TROUPE_TERMINATION_MESSAGE_PATH``
  either way. Its content (last 4 KiB), or with ``FallbackToLogsOnError`` and
  a non-zero exit the log's tail, becomes the terminated state's message.
- Restarts follow ``restartPolicy`` with a back-off of 1s doubling to 30s
  (the kubelet's 10s..5min, shortened for tests), reset after a run of 60s.
- Init containers run one at a time to success before the app containers.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from troupe_devcluster.processnode import logs, mountexec, volumes
from troupe_devcluster.processnode.env import base_env, container_argv, container_env
from troupe_devcluster.processnode.ipam import IPPool
from troupe_devcluster.processnode.kube import EXPECTED_ERRORS, STRATEGIC_MERGE, ApiError, Kube
from troupe_devcluster.processnode.probes import (
    Prober,
    ProbeSpec,
    ProbeTarget,
    ProbeTracker,
    container_ports,
)
from troupe_devcluster.processnode.process import (
    ContainerProcess,
    CreateContainerError,
    exit_status,
)
from troupe_devcluster.processnode.sources import JSON, ConfigError, Sources, referenced_names
from troupe_devcluster.processnode.status import (
    NODE_IP,
    ContainerView,
    PodView,
    Running,
    State,
    Terminated,
    Waiting,
    build_pod_status,
)

log = logging.getLogger(__name__)

BACKOFF_INITIAL_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
BACKOFF_RESET_AFTER_SECONDS = 60.0
CONFIG_RETRY_SECONDS = 1.0
TICK_SECONDS = 0.25
MAX_RETRY_SECONDS = 5.0
VOLUME_RESYNC_SECONDS = 10.0
DEFAULT_GRACE_SECONDS = 30.0
# The kubelet's floor for pods whose API object is already gone (force deletion).
GONE_GRACE_SECONDS = 2.0
# How long past SIGKILL to wait for a process before giving up on it.
KILL_WAIT_SECONDS = 5.0
TERMINAL_PHASES = ("Succeeded", "Failed")
# How long an exited container's last output may take to reach its log file.
LOG_DRAIN_SECONDS = 2.0
# The kubelet's cap on a termination message file (it reads the file's end).
MAX_TERMINATION_MESSAGE_BYTES = 4096
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_ENV = "TROUPE_TERMINATION_MESSAGE_PATH"


class LogUnavailable(Exception):
    """A container has no log to show (yet): the kubelet's 400 with this message."""


@dataclass(frozen=True)
class LogSource:
    """One container instance's log file, and whether that instance has finished."""

    path: Path
    finished: Callable[[], bool]


@dataclass(frozen=True)
class NodeContext:
    """What every pod worker shares: the API, the node's name, its workdir and IP pool.

    ``api_server`` is the URL containers reach the API server at (their
    ``KUBERNETES_SERVICE_*``); ``real_mounts`` runs each container in a mount
    namespace of its own with its volumes at their mountPaths.
    """

    kube: Kube
    node_name: str
    workdir: Path
    pool: IPPool
    tool_dir: str = field(default_factory=lambda: os.path.dirname(sys.executable))
    api_server: str | None = None
    real_mounts: bool = False


def _now() -> datetime:
    return datetime.now(UTC)


def grace_seconds(pod: JSON) -> float:
    """The deletion grace period, else the spec's, else the 30s default."""
    metadata = pod.get("metadata") or {}
    if metadata.get("deletionGracePeriodSeconds") is not None:
        return float(metadata["deletionGracePeriodSeconds"])
    spec = pod.get("spec") or {}
    if spec.get("terminationGracePeriodSeconds") is not None:
        return float(spec["terminationGracePeriodSeconds"])
    return DEFAULT_GRACE_SECONDS


def should_restart(policy: str, exit_code: int) -> bool:
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def _read_end(path: Path, limit: int) -> str:
    try:
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(size - limit, 0))
            return file.read().decode(errors="replace")
    except OSError:
        return ""


def termination_message(container: JSON, exit_code: int, message_file: Path, log: Path) -> str:
    """What the kubelet reports as a terminated container's message.

    The termination message file's content; when it is empty, a container
    with ``FallbackToLogsOnError`` that failed gets the tail of its log.
    """
    written = _read_end(message_file, MAX_TERMINATION_MESSAGE_BYTES)
    if written:
        return written
    policy = container.get("terminationMessagePolicy") or "File"
    if policy == "FallbackToLogsOnError" and exit_code != 0:
        return logs.last_lines(log)
    return ""


@dataclass
class _Slot:
    """One container of the pod across all of its restarts."""

    spec: JSON
    pending: Waiting
    state: State
    process: ContainerProcess | None = None
    last_terminated: Terminated | None = None
    restart_count: int = 0
    has_run: bool = False
    done: bool = False
    backoff: float = BACKOFF_INITIAL_SECONDS
    next_start: float = 0.0
    kill_message: str = ""
    # The instances (restart counts) `kubectl logs` and `--previous` show, set
    # as one tuple so the kubelet endpoint's threads read a consistent pair.
    log_instances: tuple[int | None, int | None] = (None, None)
    probers: list[Prober] = field(default_factory=list)
    startup: ProbeTracker | None = None
    liveness: ProbeTracker | None = None
    readiness: ProbeTracker | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def started(self) -> bool:
        return self.process is not None and (self.startup is None or self.startup.result)

    def ready(self) -> bool:
        return self.started() and (self.readiness is None or self.readiness.result)

    def succeeded(self) -> bool:
        return isinstance(self.state, Terminated) and self.state.exit_code == 0

    def probe_failure(self) -> str | None:
        if self.startup is not None and self.startup.failing:
            return "startup probe failed"
        if self.liveness is not None and self.liveness.failing:
            return "liveness probe failed"
        return None

    def stop_probers(self) -> None:
        for prober in self.probers:
            prober.stop()
        self.probers = []
        self.startup = self.liveness = self.readiness = None

    def view(self) -> ContainerView:
        return ContainerView(
            name=self.name,
            image=str(self.spec.get("image", "")),
            state=self.state,
            last_terminated=self.last_terminated,
            restart_count=self.restart_count,
            ready=self.ready(),
            started=self.started(),
        )


def _slot(spec: JSON, reason: str, earlier: list[JSON]) -> _Slot:
    """A fresh slot; one that ran before this node (re)started counts on from its restarts."""
    slot = _Slot(spec=spec, pending=Waiting(reason), state=Waiting(reason))
    for status in earlier:
        if status.get("name") == spec["name"] and status.get("containerID"):
            slot.has_run = True
            slot.restart_count = int(status.get("restartCount", 0))
    return slot


class PodWorker:
    """Owns one pod, in a thread of its own, from first sight until it is deleted or gone.

    Other threads only hand it news (``update``, ``forget``, ``shutdown``);
    it alone touches its processes. Any error in a round is logged and the
    next round retries, so one bad pod cannot take the node down.
    """

    def __init__(self, pod: JSON, node: NodeContext, on_exit: Callable[[str], None]) -> None:
        metadata = pod["metadata"]
        self.label = f"{metadata['namespace']}/{metadata['name']}"
        self.uid: str = metadata["uid"]
        self._thread = threading.Thread(target=self._run, name=f"pod {self.label}", daemon=True)
        self._node = node
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pod = pod
        self._gone = False
        self._shutdown_grace: float | None = None
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        self._policy: str = spec.get("restartPolicy", "Always")
        self._directory = volumes.pod_dir(node.workdir, pod)
        self._host_network = bool(spec.get("hostNetwork"))
        self._ip: str | None = None
        # A pod seen again after a node restart keeps the start time it had.
        earlier_start = status.get("startTime")
        self._start_time = datetime.fromisoformat(earlier_start) if earlier_start else _now()
        self._prepared = False
        self._next_prepare = 0.0
        self._next_resync = 0.0
        self._written: JSON | None = None
        self._tokens: dict[tuple[str | None, int], tuple[str, float]] = {}
        self._pumps: dict[tuple[str, int], logs.LogPump] = {}
        # A pod already finished when the node first sees it (say, after a node
        # restart) is only watched for deletion: it must not run again.
        self._managed = status.get("phase") not in TERMINAL_PHASES
        self._idle = not self._managed
        waiting = "PodInitializing" if spec.get("initContainers") else "ContainerCreating"
        earlier = status.get("initContainerStatuses") or []
        self._init = [
            _slot(c, "PodInitializing", earlier) for c in spec.get("initContainers") or []
        ]
        earlier = status.get("containerStatuses") or []
        self._containers = [_slot(c, waiting, earlier) for c in spec["containers"]]
        for slot in self._slots():
            # The last instance an earlier node process ran is still on disk: show it.
            if slot.has_run and slot.restart_count in logs.instances(self._directory, slot.name):
                slot.log_instances = (slot.restart_count, slot.restart_count)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def update(self, pod: JSON) -> None:
        with self._lock:
            self._pod = pod
        self._wake.set()

    def forget(self) -> None:
        """The pod's API object is gone: stop its processes and end, touching no API."""
        with self._lock:
            self._gone = True
        self._wake.set()

    def shutdown(self, grace: float) -> None:
        """The node is stopping: stop the processes within ``grace`` and end."""
        with self._lock:
            self._shutdown_grace = grace
        self._wake.set()

    def log_source(self, container: str, previous: bool) -> LogSource:
        """The log of ``container``'s current instance, or of the one before with
        ``previous``, chosen as the kubelet chooses; LogUnavailable otherwise."""
        name = self.label.split("/", 1)[1]
        slot = next((slot for slot in self._slots() if slot.name == container), None)
        if slot is None:
            raise LogUnavailable(f'container "{container}" not found in pod "{name}"')
        current, earlier = slot.log_instances
        index = earlier if previous else current
        if index is None:
            if previous:
                message = f'previous terminated container "{container}" in pod "{name}" not found'
                raise LogUnavailable(message)
            state = slot.state
            reason = state.reason if isinstance(state, Waiting) else "ContainerCreating"
            raise LogUnavailable(
                f'container "{container}" in pod "{name}" is waiting to start: {reason}'
            )
        path = logs.instance_log(self._directory, container, index)
        if not path.exists():
            raise LogUnavailable(f'the log of container "{container}" in pod "{name}" is gone')
        with self._lock:
            pump = self._pumps.get((container, index))
        return LogSource(path, pump.done.is_set if pump is not None else lambda: True)

    def _current(self) -> tuple[JSON, bool, float | None]:
        with self._lock:
            return self._pod, self._gone, self._shutdown_grace

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("%s: worker failed; stopping its processes", self.label)
        finally:
            for slot in self._slots():
                slot.stop_probers()
                if slot.process is not None:
                    slot.process.terminate(0)
                    slot.process.poll()
            if self._ip is not None and not self._host_network:
                self._node.pool.release(self._ip)
            self._on_exit(self.uid)

    def _loop(self) -> None:
        delay = TICK_SECONDS
        while True:
            pod, gone, shutdown_grace = self._current()
            if shutdown_grace is not None:
                self._stop_all(shutdown_grace)
                return
            if gone:
                log.info("%s: pod is gone; stopping its processes", self.label)
                self._stop_all(GONE_GRACE_SECONDS)
                return
            if (pod.get("metadata") or {}).get("deletionTimestamp"):
                grace = grace_seconds(pod)
                log.info("%s: deleting with a grace period of %gs", self.label, grace)
                self._stop_all(grace)
                self._delete_pod(pod)
                return
            if self._managed:
                try:
                    self._sync(pod)
                    delay = TICK_SECONDS
                except Exception as error:
                    # API trouble is expected now and then; only surprises get a traceback.
                    trace = not isinstance(error, EXPECTED_ERRORS)
                    log.warning("%s: sync failed: %s", self.label, error, exc_info=trace)
                    delay = min(delay * 2, MAX_RETRY_SECONDS)
            self._wake.wait(delay)
            self._wake.clear()

    def _slots(self) -> list[_Slot]:
        return [*self._init, *self._containers]

    def _stop_all(self, grace: float) -> None:
        """Stop every process: SIGTERM now, SIGKILL after ``grace``; shutdown may shorten it."""
        deadline = time.monotonic() + grace + KILL_WAIT_SECONDS
        for slot in self._slots():
            slot.stop_probers()
            if slot.process is not None:
                slot.process.terminate(grace)
        while time.monotonic() < deadline:
            _, _, shutdown_grace = self._current()
            for slot in self._slots():
                process = slot.process
                if process is None:
                    continue
                if shutdown_grace is not None:
                    process.terminate(shutdown_grace)
                if process.poll() is not None:
                    slot.process = None
            if all(slot.process is None for slot in self._slots()):
                return
            self._wake.wait(TICK_SECONDS / 5)
            self._wake.clear()
        log.warning("%s: processes outlived SIGKILL; giving up on them", self.label)

    def _delete_pod(self, pod: JSON) -> None:
        """Delete the API object for good now that nothing runs (grace 0, this uid only)."""
        metadata = pod["metadata"]
        path = f"/api/v1/namespaces/{metadata['namespace']}/pods/{metadata['name']}"
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": self.uid},
        }
        while True:
            try:
                self._node.kube.request("DELETE", path, body=body)
                return
            except ApiError as error:
                if error.status in (404, 409):
                    return
                log.warning("%s: delete failed: %s", self.label, error)
            except Exception as error:
                log.warning("%s: delete failed: %s", self.label, error)
            _, gone, shutdown_grace = self._current()
            if gone or shutdown_grace is not None:
                return
            self._wake.wait(CONFIG_RETRY_SECONDS)
            self._wake.clear()

    def _sync(self, pod: JSON) -> None:
        if self._ip is None:
            preferred = (pod.get("status") or {}).get("podIP")
            self._ip = NODE_IP if self._host_network else self._node.pool.allocate(preferred)
        if not self._idle:
            fetched: list[Sources] = []

            def sources() -> Sources:
                if not fetched:
                    fetched.append(self._fetch_sources(pod))
                return fetched[0]

            if self._prepare(pod, sources):
                self._run_containers(pod, sources)
        view = PodView(
            pod_ip=self._ip,
            start_time=self._start_time,
            init_containers=[slot.view() for slot in self._init],
            containers=[slot.view() for slot in self._containers],
        )
        status = build_pod_status(pod, view, self._written or pod.get("status"), _now())
        if status["phase"] in TERMINAL_PHASES and not self._idle:
            log.info("%s: pod %s", self.label, status["phase"])
            self._idle = True
        if status != self._written:
            metadata = pod["metadata"]
            self._node.kube.request(
                "PATCH",
                f"/api/v1/namespaces/{metadata['namespace']}/pods/{metadata['name']}/status",
                # The uid makes the patch fail rather than land on a new pod of the same name.
                body={"metadata": {"uid": self.uid}, "status": status},
                content_type=STRATEGIC_MERGE,
            )
            self._written = status

    def _fetch_sources(self, pod: JSON) -> Sources:
        namespace = pod["metadata"]["namespace"]
        config_map_names, secret_names = referenced_names(pod)
        base = f"/api/v1/namespaces/{namespace}"
        get = self._node.kube.get_or_none
        return Sources(
            config_maps={name: get(f"{base}/configmaps/{name}") for name in config_map_names},
            secrets={name: get(f"{base}/secrets/{name}") for name in secret_names},
        )

    def _token(self, pod: JSON, audience: str | None, seconds: int) -> str:
        """A bound service-account token, requested again after 80% of its life."""
        cached = self._tokens.get((audience, seconds))
        if cached is not None and time.monotonic() < cached[1]:
            return cached[0]
        metadata = pod["metadata"]
        account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [audience] if audience else [],
                "expirationSeconds": seconds,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": metadata["name"],
                    "uid": self.uid,
                },
            },
        }
        path = f"/api/v1/namespaces/{metadata['namespace']}/serviceaccounts/{account}/token"
        try:
            answer = self._node.kube.request("POST", path, body=body)
        except ApiError as error:
            message = f'cannot get a token for service account "{account}": {error}'
            raise ConfigError(message) from error
        token = str(answer["status"]["token"])
        self._tokens[(audience, seconds)] = (token, time.monotonic() + 0.8 * seconds)
        return token

    def _write_volumes(self, pod: JSON, sources: Sources) -> None:
        assert self._ip is not None
        for volume in (pod.get("spec") or {}).get("volumes") or []:
            plan = volumes.plan_volume(
                volume,
                pod,
                sources,
                lambda audience, seconds: self._token(pod, audience, seconds),
                pod_ip=self._ip,
                host_ip=NODE_IP,
            )
            volumes.write_volume(volumes.volume_dir(self._directory, volume["name"]), plan)

    def _prepare(self, pod: JSON, sources: Callable[[], Sources]) -> bool:
        """Lay out the pod dir once (volumes, mount links); refresh volumes now and then.

        Returns whether the containers may run. A ConfigError keeps every
        container that has not run yet waiting, and is retried shortly.
        """
        now = time.monotonic()
        if self._prepared:
            if now >= self._next_resync:
                self._next_resync = now + VOLUME_RESYNC_SECONDS
                # Running containers must not wait on the API: keep the old contents.
                try:
                    self._write_volumes(pod, sources())
                except (ConfigError, *EXPECTED_ERRORS) as error:
                    log.warning("%s: volumes not refreshed: %s", self.label, error)
            return True
        if now < self._next_prepare:
            return False
        try:
            if any(slot.spec.get("restartPolicy") == "Always" for slot in self._init):
                raise ConfigError("restartable init containers (sidecars) are not supported")
            self._directory.mkdir(parents=True, exist_ok=True)
            self._write_volumes(pod, sources())
            volumes.write_mount_links(volumes.mount_links(pod, self._directory))
        except ConfigError as error:
            self._next_prepare = now + CONFIG_RETRY_SECONDS
            for slot in self._slots():
                if not slot.has_run:
                    slot.state = Waiting("CreateContainerConfigError", str(error))
            return False
        self._prepared = True
        self._next_resync = now + VOLUME_RESYNC_SECONDS
        for slot in self._slots():
            if not slot.has_run:
                slot.state = slot.pending
        return True

    def _run_containers(self, pod: JSON, sources: Callable[[], Sources]) -> None:
        init_policy = "Never" if self._policy == "Never" else "OnFailure"
        for slot in self._init:
            if slot.succeeded():
                continue
            if not slot.done:
                self._tick(slot, init_policy, pod, sources)
            return
        for slot in self._containers:
            self._tick(slot, self._policy, pod, sources)

    def _tick(self, slot: _Slot, policy: str, pod: JSON, sources: Callable[[], Sources]) -> None:
        """Advance one container: notice its exit, act on failed probes, (re)start it."""
        if slot.process is not None:
            returncode = slot.process.poll()
            if returncode is None:
                failure = slot.probe_failure()
                if failure and not slot.process.terminating:
                    log.info("%s: container %s %s; killing it", self.label, slot.name, failure)
                    slot.kill_message = failure
                    slot.process.terminate(grace_seconds(pod))
                return
            self._exited(slot, returncode, policy, pod)
            return
        if not slot.done and time.monotonic() >= slot.next_start:
            self._start(slot, policy, pod, sources)

    def _exited(self, slot: _Slot, returncode: int, policy: str, pod: JSON) -> None:
        process = slot.process
        assert process is not None
        exit_code, signal_number = exit_status(returncode)
        log.info("%s: container %s exited with %d", self.label, slot.name, exit_code)
        finished_at = _now()
        if not process.logs.wait(LOG_DRAIN_SECONDS):
            log.warning("%s: container %s left its output open", self.label, slot.name)
        index = slot.log_instances[0]
        written = ""
        if index is not None:
            written = termination_message(
                slot.spec,
                exit_code,
                self._termination_file(slot.name),
                logs.instance_log(self._directory, slot.name, index),
            )
        terminated = Terminated(
            exit_code=exit_code,
            reason="Completed" if exit_code == 0 else "Error",
            finished_at=finished_at,
            started_at=process.started_at,
            pid=process.pid,
            signal=signal_number,
            message=": ".join(part for part in (slot.kill_message, written) if part),
        )
        slot.stop_probers()
        slot.process = None
        slot.kill_message = ""
        ran = time.monotonic() - process.started_monotonic
        self._after_exit(slot, terminated, policy, pod, ran)

    def _after_exit(
        self, slot: _Slot, terminated: Terminated, policy: str, pod: JSON, ran: float
    ) -> None:
        if not should_restart(policy, terminated.exit_code):
            slot.state = terminated
            slot.done = True
            return
        if ran >= BACKOFF_RESET_AFTER_SECONDS:
            slot.backoff = BACKOFF_INITIAL_SECONDS
        delay = slot.backoff
        slot.backoff = min(slot.backoff * 2, BACKOFF_MAX_SECONDS)
        slot.last_terminated = terminated
        # Backing off, the kubelet shows the instance that just ended for both.
        slot.log_instances = (slot.log_instances[0], slot.log_instances[0])
        slot.next_start = time.monotonic() + delay
        slot.state = Waiting(
            "CrashLoopBackOff",
            f"back-off {delay:g}s restarting failed container={slot.name} "
            f"pod={pod['metadata']['name']}",
        )

    def _start(self, slot: _Slot, policy: str, pod: JSON, sources: Callable[[], Sources]) -> None:
        assert self._ip is not None
        base = base_env(
            pod,
            pod_ip=self._ip,
            node_env=os.environ,
            tool_dir=self._node.tool_dir,
            api_server=self._node.api_server,
        )
        base.update(volumes.volume_env(pod, self._directory))
        mounts: list[mountexec.Mount] | None = None
        try:
            env = container_env(
                pod, slot.spec, sources(), base=base, pod_ip=self._ip, host_ip=NODE_IP
            )
            argv = container_argv(slot.spec, env)
            if self._node.real_mounts:
                mounts = volumes.container_mounts(pod, slot.spec, self._directory)
        except ConfigError as error:
            slot.state = Waiting("CreateContainerConfigError", str(error))
            slot.next_start = time.monotonic() + CONFIG_RETRY_SECONDS
            return
        except EXPECTED_ERRORS as error:
            # The API is unreachable: try again soon, and let the other containers tick.
            log.warning("%s: cannot start container %s yet: %s", self.label, slot.name, error)
            slot.next_start = time.monotonic() + CONFIG_RETRY_SECONDS
            return
        index = slot.restart_count + (1 if slot.has_run else 0)
        log_path = logs.instance_log(self._directory, slot.name, index)
        try:
            message_file = self._fresh_termination_file(slot.name)
            env[TERMINATION_MESSAGE_ENV] = str(message_file)
            if mounts is not None:
                target = slot.spec.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH
                if all(mount.target != target for mount in mounts):
                    mounts.append(
                        mountexec.Mount(
                            "termination-log", str(message_file), target, False, str(message_file)
                        )
                    )
            logs.prune(self._directory, slot.name, index)
            process = ContainerProcess(
                argv,
                env,
                self._directory,
                log_path,
                mounts,
                plain_log=self._directory / f"{slot.name}.log",
            )
        except CreateContainerError as error:
            # Nothing ran: no restart is counted, and the next try backs off.
            log.info("%s: container %s cannot be created: %s", self.label, slot.name, error)
            slot.state = Waiting("CreateContainerError", str(error))
            slot.next_start = time.monotonic() + slot.backoff
            slot.backoff = min(slot.backoff * 2, BACKOFF_MAX_SECONDS)
            return
        except (OSError, ValueError) as error:
            self._count_start(slot)
            slot.log_instances = (index, slot.log_instances[1])
            log.info("%s: container %s failed to start: %s", self.label, slot.name, error)
            failed = Terminated(
                exit_code=128, reason="StartError", finished_at=_now(), message=str(error)
            )
            self._after_exit(slot, failed, policy, pod, 0.0)
            return
        self._count_start(slot)
        log.info("%s: started container %s as pid %d", self.label, slot.name, process.pid)
        with self._lock:
            self._pumps[(slot.name, index)] = process.logs
            for key in [key for key in self._pumps if key[0] == slot.name and key[1] < index - 1]:
                del self._pumps[key]
        slot.log_instances = (index, slot.log_instances[1])
        slot.process = process
        slot.state = Running(process.pid, process.started_at)
        prefix: tuple[str, ...] = ()
        if mounts is not None:
            # Exec probes look at the container's files, so they run among its mounts.
            prefix = tuple(mountexec.enter_argv(sys.executable, process.pid, []))
        target = ProbeTarget(self._ip, container_ports(slot.spec), env, self._directory, prefix)
        self._start_probers(slot, target)

    def _termination_file(self, container: str) -> Path:
        return self._directory / "termination" / container

    def _fresh_termination_file(self, container: str) -> Path:
        """An empty termination message file for a new instance, writable by it."""
        path = self._termination_file(container)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        path.chmod(0o666)
        return path

    @staticmethod
    def _count_start(slot: _Slot) -> None:
        if slot.has_run:
            slot.restart_count += 1
        slot.has_run = True

    def _start_probers(self, slot: _Slot, target: ProbeTarget) -> None:
        spec = slot.spec
        name = f"{self.label}/{slot.name}"
        startup = spec.get("startupProbe")
        if startup:
            probe = ProbeSpec.parse(startup)
            slot.startup = ProbeTracker(probe, initial=False)
            slot.probers.append(
                Prober(
                    f"{name} startup",
                    probe,
                    slot.startup,
                    target,
                    self._wake.set,
                    until_success=True,
                )
            )
        startup_tracker = slot.startup

        def started() -> bool:
            return startup_tracker is None or startup_tracker.result

        for kind, initial in (("livenessProbe", True), ("readinessProbe", False)):
            if not spec.get(kind):
                continue
            probe = ProbeSpec.parse(spec[kind])
            tracker = ProbeTracker(probe, initial=initial)
            if kind == "livenessProbe":
                slot.liveness = tracker
            else:
                slot.readiness = tracker
            label = f"{name} {kind.removesuffix('Probe')}"
            slot.probers.append(Prober(label, probe, tracker, target, self._wake.set, started))
        for prober in slot.probers:
            prober.start()
