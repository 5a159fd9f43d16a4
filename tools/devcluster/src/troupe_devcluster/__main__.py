"""``python -m troupe_devcluster up|down|env``: the launcher for people and make targets."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from troupe_devcluster import launcher, processes
from troupe_devcluster.layout import Layout

REPO = Path(__file__).resolve().parents[4]
DEFAULT_STATE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "troupe" / "cluster.json"
)


def build_binaries() -> Path:
    """Build (or find in the cache) the control-plane binaries; return their directory."""
    script = REPO / "tools" / "build-controlplane.sh"
    result = subprocess.run([str(script)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(result.stdout.strip().splitlines()[-1])


@contextmanager
def cluster(
    kubeconfig: Path | None, nats_url: str | None, nats_nodes: int = 1
) -> Iterator[tuple[Path, str]]:
    """The cluster given (kubeconfig and NATS URL), else a fresh local one for the duration."""
    if kubeconfig and nats_url:
        yield kubeconfig, nats_url
        return
    layout = launcher.up(build_binaries(), nats_nodes=nats_nodes)
    try:
        yield layout.kubeconfig, layout.nats_url
    finally:
        launcher.down(layout)


def _load(state: Path) -> Layout | None:
    return Layout.from_json(state.read_text()) if state.exists() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="troupe_devcluster", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "env"])
    parser.add_argument(
        "--state", type=Path, default=DEFAULT_STATE, help="the cluster's state file"
    )
    parser.add_argument(
        "--nats",
        type=int,
        default=1,
        choices=[1, 3, 5],
        help="nats-servers to start: 1 (a lone server) or a JetStream cluster of 3 or 5",
    )
    args = parser.parse_args(argv)
    state: Path = args.state
    existing = _load(state)

    if args.command == "up":
        if existing and all(processes.alive(pid) for pid in existing.pids.values()):
            print(launcher.env_lines(existing), end="")
            return 0
        if existing:
            launcher.down(existing)
        started = time.monotonic()
        try:
            layout = launcher.up(build_binaries(), nats_nodes=args.nats)
        except processes.ComponentError as error:
            print(f"cluster failed to start: {error}", file=sys.stderr)
            return 1
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(layout.to_json())
        print(
            f"cluster ready in {time.monotonic() - started:.1f}s ({layout.root})", file=sys.stderr
        )
        print(launcher.env_lines(layout), end="")
    elif args.command == "down":
        if existing:
            launcher.down(existing)
            state.unlink()
    elif existing is None:
        print("no cluster is running: run `make cluster-up`", file=sys.stderr)
        return 1
    else:
        print(launcher.env_lines(existing), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
