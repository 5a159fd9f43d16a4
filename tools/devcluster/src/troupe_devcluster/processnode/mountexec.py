"""Puts a container's volumes at their real ``mountPath`` s, then becomes the container.

The node starts every container as

    <python> -I -S <this file> '<spec json>' <container argv...>

and this program, single-threaded and stdlib-only (``-S``: no site, so it
starts fast; ``-I``: the container's ``PYTHON*`` variables do not touch it),
does what a container runtime would before running the entrypoint:

- ``unshare(CLONE_NEWNS)`` and mark every mount private, so nothing mounted
  here ever shows on the host or in another container;
- for each mount, shallowest ``mountPath`` first: create the mount point
  (a directory, or an empty file when the source is a file), bind-mount the
  volume dir (or its ``subPath``) onto it, and remount it read-only when asked;
- reset the signals Python ignores (SIGPIPE, SIGXFSZ) and ``execvp`` the
  container's argv with the environment and cwd it was started with.

The exec keeps the pid, so the node's pid is the container's and signals to
its process group reach the container itself; nothing lingers.

Failures are written as one JSON object to the spec's ``status_fd`` (a pipe
the node reads until it closes on exec): ``{"error": "mount" | "exec", ...}``.
The node turns ``mount`` into ``CreateContainerError`` and ``exec`` into the
same ``OSError`` a plain start would have raised.

``{"enter": <pid>}`` instead joins the mount namespace of that container
(``setns``) to run an exec probe where the container's files are;
``{"probe": true}`` only checks that mount namespaces can be made here.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
# Flags a read-only remount must repeat or the kernel may refuse it (locked mounts).
KEPT_FLAGS = (
    os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC | os.ST_NOATIME | os.ST_NODIRATIME | os.ST_RELATIME
)


@dataclass(frozen=True)
class Mount:
    """One volumeMount of one container, resolved to host paths."""

    volume: str
    source: str
    target: str
    read_only: bool
    # The volume dir: a subPath source must stay inside it.
    root: str

    def to_json(self) -> dict[str, Any]:
        return {
            "volume": self.volume,
            "source": self.source,
            "target": self.target,
            "readOnly": self.read_only,
            "root": self.root,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Mount:
        return cls(
            volume=str(data["volume"]),
            source=str(data["source"]),
            target=str(data["target"]),
            read_only=bool(data["readOnly"]),
            root=str(data["root"]),
        )


class MountError(Exception):
    """A mount could not be made: the container cannot be created."""


def this_file() -> str:
    return os.path.abspath(__file__)


def run_argv(
    python: str, mounts: Sequence[Mount], argv: Sequence[str], status_fd: int
) -> list[str]:
    """The argv that runs ``argv`` with ``mounts`` in a mount namespace of its own."""
    spec = {"mounts": [mount.to_json() for mount in mounts], "status_fd": status_fd}
    return [python, "-I", "-S", this_file(), json.dumps(spec), *argv]


def enter_argv(python: str, pid: int, argv: Sequence[str]) -> list[str]:
    """The argv that runs ``argv`` in the mount namespace of process ``pid``."""
    return [python, "-I", "-S", this_file(), json.dumps({"enter": pid}), *argv]


def probe_argv(python: str) -> list[str]:
    """The argv that exits 0 when this machine lets the node make mount namespaces."""
    return [python, "-I", "-S", this_file(), json.dumps({"probe": True})]


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _call(result: int, what: str) -> None:
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def _mount(libc: Any, source: str | None, target: str, flags: int) -> None:
    encoded = os.fsencode(source) if source is not None else None
    _call(libc.mount(encoded, os.fsencode(target), None, flags, None), f"mount {target}")


def isolate(libc: Any) -> None:
    """A mount namespace of our own whose mounts propagate nowhere."""
    _call(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(libc, None, "/", MS_REC | MS_PRIVATE)


def resolve_source(mount: Mount) -> str:
    """The source path, a missing subPath created as a directory (as the kubelet does).

    A subPath that leads out of its volume (through a symlink) is refused.
    """
    if mount.source != mount.root and not os.path.lexists(mount.source):
        os.makedirs(mount.source, exist_ok=True)
    if not os.path.exists(mount.source):
        raise MountError(f"{mount.source} does not exist")
    real_root = os.path.realpath(mount.root)
    real_source = os.path.realpath(mount.source)
    if real_source != real_root and not real_source.startswith(real_root.rstrip("/") + "/"):
        raise MountError(f"subPath {mount.source} leads outside the volume")
    return real_source


def prepare_target(source: str, target: str) -> None:
    """Create the mount point: a directory for a directory source, else an empty file."""
    if os.path.isdir(source):
        if os.path.lexists(target) and not os.path.isdir(target):
            raise MountError(f"{target} exists and is not a directory")
        os.makedirs(target, exist_ok=True)
        return
    if os.path.isdir(target):
        raise MountError(f"{target} is a directory but the source {source} is a file")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not os.path.lexists(target):
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def bind(libc: Any, mount: Mount) -> None:
    """Make ``mount`` in the current (private) namespace."""
    try:
        source = resolve_source(mount)
        prepare_target(source, mount.target)
        _mount(libc, source, mount.target, MS_BIND | MS_REC)
        if mount.read_only:
            kept = os.statvfs(mount.target).f_flag & KEPT_FLAGS
            _mount(libc, None, mount.target, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
    except (OSError, MountError) as error:
        raise MountError(f'volume "{mount.volume}" at {mount.target}: {error}') from None


def hides(target: str, paths: Sequence[str]) -> str | None:
    """The first of ``paths`` that a mount at ``target`` would hide, if any."""
    top = target.rstrip("/") or "/"
    for path in paths:
        if path == top or path.startswith(top.rstrip("/") + "/"):
            return path
    return None


def needed_paths(mounts: Sequence[Mount]) -> list[str]:
    """What the container needs from the host: the venv, its cwd, its volumes."""
    venv = os.path.dirname(os.path.dirname(os.path.abspath(sys.executable)))
    return [os.path.realpath(p) for p in (venv, os.getcwd(), *(m.root for m in mounts))]


def bind_all(libc: Any, mounts: Sequence[Mount]) -> None:
    """Make every mount, except one that would hide what the container runs from.

    On a real node the image brings its own filesystem; here the container runs
    from the host's, so e.g. an emptyDir at /tmp must not cover a venv or a pod
    dir under /tmp. Such a volume stays at its own path (TMPDIR for /tmp).
    """
    needed = needed_paths(mounts)
    for mount in mounts:
        hidden = hides(mount.target, needed)
        if hidden is None:
            bind(libc, mount)
            continue
        sys.stderr.write(
            f'mountexec: volume "{mount.volume}" is not mounted at {mount.target}: '
            f"it would hide {hidden}\n"
        )
        if mount.target.rstrip("/") == "/tmp":
            os.environ["TMPDIR"] = mount.source


def enter(libc: Any, pid: int) -> None:
    """Join the mount namespace of ``pid``, staying in the same working directory."""
    cwd = os.getcwd()
    fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _call(libc.setns(fd, CLONE_NEWNS), f"setns into the mounts of pid {pid}")
    finally:
        os.close(fd)
    os.chdir(cwd)


def _report(status_fd: int | None, failure: dict[str, Any]) -> None:
    where = f"{failure['filename']}: " if failure.get("filename") else ""
    sys.stderr.write(f"mountexec: {where}{failure['message']}\n")
    sys.stderr.flush()
    if status_fd is not None:
        os.write(status_fd, json.dumps(failure).encode())


def main(args: list[str]) -> int:
    spec: dict[str, Any] = json.loads(args[0])
    argv = args[1:]
    status_fd: int | None = spec.get("status_fd")
    libc = _libc()
    try:
        if spec.get("probe"):
            isolate(libc)
            return 0
        if "enter" in spec:
            enter(libc, int(spec["enter"]))
        else:
            isolate(libc)
            bind_all(libc, [Mount.from_json(mount) for mount in spec.get("mounts") or []])
    except (OSError, MountError) as error:
        _report(status_fd, {"error": "mount", "message": str(error)})
        return 126
    # Python ignores these; an exec would pass the ignoring on to the container.
    for number in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(number, signal.SIG_DFL)
    if status_fd is not None:
        os.set_inheritable(status_fd, False)
    if not argv:
        _report(status_fd, {"error": "exec", "errno": errno.ENOENT, "message": "empty argv"})
        return 127
    try:
        os.execvp(argv[0], argv)
    except OSError as error:
        failure = {
            "error": "exec",
            "errno": error.errno,
            "message": error.strerror or str(error),
            "filename": argv[0],
        }
        _report(status_fd, failure)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
