"""One container instance as an OS process.

Each process starts in its own session, so its pid is also its process-group
id and a signal to the group reaches everything it spawned, as stopping a
container stops its whole cgroup. Stopping never blocks: ``terminate`` sends
SIGTERM and arms a deadline, and ``poll`` sends SIGKILL once it has passed.

Given ``mounts``, the process is started through ``mountexec``, which makes
them in a mount namespace of the container's own and then execs the
container's argv (same pid). The start waits for that exec: a mount that
fails raises ``CreateContainerError``, a program that cannot be run the same
``OSError`` a plain start raises.

stdout and stderr are pipes a ``LogPump`` copies into the instance's CRI log
(timestamped, per stream), as a container runtime does for the kubelet.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from troupe_devcluster.processnode import mountexec
from troupe_devcluster.processnode.logs import LogPump
from troupe_devcluster.processnode.mountexec import Mount

# How long mountexec may take to make the mounts and exec before the start fails.
EXEC_DEADLINE_SECONDS = 30.0


class CreateContainerError(Exception):
    """The container's mounts could not be made: the kubelet's ``CreateContainerError``."""


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Signal a process group that may already be gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def exit_status(returncode: int) -> tuple[int, int | None]:
    """Popen's returncode as (exitCode, signal), a signal death being 128+N as in a shell."""
    if returncode < 0:
        return 128 - returncode, -returncode
    return returncode, None


def _read_failure(fd: int, deadline: float) -> bytes | None:
    """What mountexec wrote to its status pipe before it closed (b"" on exec); None on timeout."""
    data = b""
    # poll, not select: the node may hold more than FD_SETSIZE descriptors.
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        if poller.poll(remaining * 1000):
            chunk = os.read(fd, 65536)
            if not chunk:
                return data
            data += chunk


def _failure_error(report: bytes) -> Exception:
    try:
        failure = json.loads(report)
    except ValueError:
        return CreateContainerError(report.decode(errors="replace"))
    if failure.get("error") == "exec":
        return OSError(failure.get("errno") or 0, failure["message"], failure.get("filename"))
    return CreateContainerError(str(failure.get("message")))


class ContainerProcess:
    """A started container process; its stdout and stderr go to the CRI log ``log``
    (and their raw bytes to ``plain_log``); ``logs`` is the pump writing them."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path,
        log: Path,
        mounts: Sequence[Mount] | None = None,
        plain_log: Path | None = None,
    ) -> None:
        status_read: int | None = None
        pass_fds: tuple[int, ...] = ()
        command = list(argv)
        if mounts is not None:
            status_read, status_write = os.pipe()
            pass_fds = (status_write,)
            command = mountexec.run_argv(sys.executable, mounts, argv, status_write)
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        try:
            self._popen = subprocess.Popen(
                command,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out_write,
                stderr=err_write,
                start_new_session=True,
                pass_fds=pass_fds,
            )
        except BaseException:
            for fd in (status_read, out_read, err_read):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in (*pass_fds, out_write, err_write):
                os.close(fd)
        # Started before the exec check, so what mountexec says on failure is logged too.
        self.logs = LogPump(out_read, err_read, log, plain_log)
        self.logs.start()
        if status_read is not None:
            self._await_exec(status_read)
        self.pid = self._popen.pid
        self.started_at = datetime.now(UTC)
        self.started_monotonic = time.monotonic()
        self._kill_at: float | None = None
        self._swept = False

    def _await_exec(self, status_read: int) -> None:
        """Wait until mountexec has exec'd the container; raise what kept it from doing so."""
        try:
            report = _read_failure(status_read, time.monotonic() + EXEC_DEADLINE_SECONDS)
        finally:
            os.close(status_read)
        if report == b"":
            return
        if report is None:
            signal_group(self._popen.pid, signal.SIGKILL)
        self._popen.wait()
        if report is None:
            raise CreateContainerError(
                f"the mounts were not made within {EXEC_DEADLINE_SECONDS:g}s"
            )
        raise _failure_error(report)

    @property
    def terminating(self) -> bool:
        return self._kill_at is not None

    def terminate(self, grace_seconds: float) -> None:
        """SIGTERM the group now and SIGKILL it once ``grace_seconds`` have passed."""
        if self._kill_at is not None:
            self._kill_at = min(self._kill_at, time.monotonic() + grace_seconds)
            return
        self._kill_at = time.monotonic() + grace_seconds
        if grace_seconds <= 0:
            signal_group(self.pid, signal.SIGKILL)
        else:
            signal_group(self.pid, signal.SIGTERM)

    def poll(self) -> int | None:
        """The returncode once the main process has exited, else None.

        Escalates to SIGKILL past the deadline, and once the main process has
        exited kills what it left behind in its group.
        """
        returncode = self._popen.poll()
        if returncode is None:
            if self._kill_at is not None and time.monotonic() >= self._kill_at:
                signal_group(self.pid, signal.SIGKILL)
            return None
        if not self._swept:
            self._swept = True
            signal_group(self.pid, signal.SIGKILL)
        return returncode
