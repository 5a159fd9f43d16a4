"""One container instance as an OS process.

Each process starts in its own session, so its pid is also its process-group
id and a signal to the group reaches everything it spawned, as stopping a
container stops its whole cgroup. Stopping never blocks: ``terminate`` sends
SIGTERM and arms a deadline, and ``poll`` sends SIGKILL once it has passed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Signal a process group that may already be gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def exit_status(returncode: int) -> tuple[int, int | None]:
    """Popen's returncode as (exitCode, signal), a signal death being 128+N as in a shell."""
    if returncode < 0:
        return 128 - returncode, -returncode
    return returncode, None


class ContainerProcess:
    """A started container process; its stdout and stderr go to ``log``."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path) -> None:
        with log.open("ab") as out:
            self._popen = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self._popen.pid
        self.started_at = datetime.now(UTC)
        self.started_monotonic = time.monotonic()
        self._kill_at: float | None = None
        self._swept = False

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
