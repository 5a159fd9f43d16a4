"""Start, watch and stop the cluster's processes.

Each component runs in its own session (process group) so that stopping it
also stops whatever it spawned, and so that the cluster outlives the
``up`` command that started it.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from troupe_devcluster.processnode.process import signal_group

# Popen objects of the processes this interpreter started: kept so that they
# are reaped through Popen (no zombies, no "still running" warnings on GC).
_children: dict[int, subprocess.Popen[bytes]] = {}


class ComponentError(RuntimeError):
    """A component failed to start; the message names it and shows its log's tail."""

    def __init__(self, component: str, problem: str, log: Path) -> None:
        super().__init__(f"{component} {problem}. Last lines of {log}:\n{tail(log)}")
        self.component = component


def tail(log: Path, lines: int = 30) -> str:
    """The last lines of a log file, or a note that there is none."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:])


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Start ``argv`` detached in a new session, logging to ``log``; return its pid."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    _children[proc.pid] = proc
    return proc.pid


def alive(pid: int) -> bool:
    """Whether ``pid`` runs and is not a zombie waiting to be reaped."""
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def stop(pids: Iterable[int], grace_seconds: float = 10.0) -> None:
    """SIGTERM each process group, then SIGKILL whatever is left after the grace period."""
    started = list(pids)
    for pid in started:
        signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    remaining = started
    while remaining and time.monotonic() < deadline:
        for pid in remaining:
            alive(pid)  # reap our own children so they do not linger as zombies
        remaining = [pid for pid in remaining if _group_alive(pid)]
        if remaining:
            time.sleep(0.05)
    for pid in remaining:
        signal_group(pid, signal.SIGKILL)
    for pid in started:
        child = _children.pop(pid, None)
        if child is not None:
            child.wait()
