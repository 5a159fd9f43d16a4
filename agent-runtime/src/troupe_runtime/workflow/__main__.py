"""``python -m troupe_runtime.workflow``: the workflow engine's container command.

The config comes from a file, as the agent runtime's does (``contract.config_file``); one
the engine cannot use, an input expression that is not JMESPath included, is logged as
one line and ends the process with ``EXIT_INVALID_CONFIG``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path

from troupe_runtime.contract import pod
from troupe_runtime.contract.config_file import InvalidConfig, config_path, read_config
from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.contract.expressions import expression_problem
from troupe_runtime.contract.pod import bind_host
from troupe_runtime.serving import logs
from troupe_runtime.workflow.service import EngineService

EXIT_INVALID_CONFIG = 1
logger = logging.getLogger("troupe_runtime.workflow")


def load_config(path: Path | None, env: Mapping[str, str]) -> EngineConfig:
    """The engine's config; ``InvalidConfig`` when unreadable, invalid, or when an input
    expression does not compile (every run reaching that step would fail)."""
    config = read_config(EngineConfig, config_path(path, env))
    for step in config.steps:
        mappings = [("input", step.input)]
        if step.compensation is not None:
            mappings.append(("compensation.input", step.compensation.input))
        for where, expressions in mappings:
            for key, expression in expressions.items():
                if (problem := expression_problem(expression)) is not None:
                    raise InvalidConfig(f"step {step.name}: {where}.{key}: {problem}")
    return config


async def serve(config: EngineConfig) -> None:
    service = EngineService(config, host=bind_host(os.environ))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, service.stop)
    await service.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="troupe_runtime.workflow", description="Troupe workflow engine."
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"the engine config file (default: ${pod.CONFIG_PATH_ENV}, else {pod.CONFIG_PATH})",
    )
    args = parser.parse_args(argv)
    logs.configure()
    try:
        config = load_config(args.config, os.environ)
    except InvalidConfig as error:
        logger.error("invalid config, not starting: %s", error)
        return EXIT_INVALID_CONFIG
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
