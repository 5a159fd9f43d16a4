"""Entry point: ``python -m troupe_runtime.agent``, the agent container's command.

The config comes from a file (``--config``, else ``$TROUPE_CONFIG``, else the ConfigMap
the operator mounts at ``contract.pod.CONFIG_PATH``). A config the runtime cannot use (a
file missing or invalid, a schema it cannot run, a handler it cannot load) is logged as
one line and ends the process with ``EXIT_INVALID_CONFIG``, before anything connects.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
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
from troupe_runtime.contract import pod
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.config_file import InvalidConfig, config_path, read_config
from troupe_runtime.contract.pod import bind_host
from troupe_runtime.serving import logs

EXIT_INVALID_CONFIG = 1
logger = logging.getLogger("troupe_runtime.agent")


def load_config(path: Path | None, env: Mapping[str, str]) -> RuntimeConfig:
    return read_config(RuntimeConfig, config_path(path, env))


def build_runtime(
    path: Path | None, env: Mapping[str, str], grace: float, liveness_bound: float
) -> Runtime:
    """The runtime for the config, its schemas compiled and its handler loaded;
    ``InvalidConfig`` when any of them cannot be used."""
    config = load_config(path, env)
    try:
        return Runtime(config, host=bind_host(env), grace=grace, liveness_bound=liveness_bound)
    except ValueError as error:
        raise InvalidConfig(str(error)) from error


async def serve(runtime: Runtime) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, runtime.stop)
    await runtime.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="troupe_runtime.agent",
        description="Troupe agent runtime: runs one agent handler on NATS JetStream.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"the runtime config file (default: ${pod.CONFIG_PATH_ENV}, else {pod.CONFIG_PATH})",
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
    try:
        runtime = build_runtime(args.config, os.environ, args.grace, args.liveness_bound)
    except InvalidConfig as error:
        logger.error("invalid config, not starting: %s", error)
        return EXIT_INVALID_CONFIG
    asyncio.run(serve(runtime))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
