"""Entry point: ``python -m troupe_runtime --config PATH``, the agent container's command."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Mapping
from pathlib import Path

from troupe_runtime import __version__
from troupe_runtime.agent.runtime import (
    DEFAULT_GRACE_SECONDS,
    DEFAULT_LIVENESS_BOUND_SECONDS,
    Runtime,
)
from troupe_runtime.contract.agent_config import CONFIG_FILE_NAME, CONFIG_JSON_ENV, RuntimeConfig
from troupe_runtime.contract.pod import bind_host
from troupe_runtime.serving import logs

CONFIG_ENV = "TROUPE_CONFIG"
DEFAULT_CONFIG = Path("/etc/troupe") / CONFIG_FILE_NAME


def load_config(path: Path | None, env: Mapping[str, str]) -> RuntimeConfig:
    """``--config`` first, then the inline JSON the operator sets, then the file."""
    if path is None and env.get(CONFIG_JSON_ENV):
        return RuntimeConfig.model_validate_json(env[CONFIG_JSON_ENV])
    return RuntimeConfig.load(path or Path(env.get(CONFIG_ENV, DEFAULT_CONFIG)))


async def serve(
    config: RuntimeConfig, grace: float, liveness_bound: float = DEFAULT_LIVENESS_BOUND_SECONDS
) -> None:
    runtime = Runtime(
        config, host=bind_host(os.environ), grace=grace, liveness_bound=liveness_bound
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, runtime.stop)
    await runtime.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="troupe_runtime",
        description="Troupe agent runtime: runs one agent handler on NATS JetStream.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"the runtime config file (default: ${CONFIG_JSON_ENV} inline, "
        f"else the file ${CONFIG_ENV} or {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_SECONDS,
        help="seconds in-flight messages may take to finish after SIGTERM",
    )
    parser.add_argument(
        "--liveness-bound",
        type=float,
        default=DEFAULT_LIVENESS_BOUND_SECONDS,
        help="seconds the runtime may be unable to process messages (NATS unreachable, "
        "the fetch loop dead) before /healthz fails and Kubernetes restarts it",
    )
    args = parser.parse_args(argv)
    logs.configure()
    asyncio.run(serve(load_config(args.config, os.environ), args.grace, args.liveness_bound))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
