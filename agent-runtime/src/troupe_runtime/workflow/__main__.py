"""``python -m troupe_runtime.workflow``: the workflow engine's container command."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

from troupe_runtime.contract.engine_config import CONFIG_JSON_ENV, EngineConfig
from troupe_runtime.contract.pod import bind_host
from troupe_runtime.serving import logs
from troupe_runtime.workflow.service import EngineService


def load_config(path: Path | None) -> EngineConfig:
    """From ``--config``, else from the env var the operator fills from a ConfigMap."""
    if path is not None:
        return EngineConfig.load(path)
    text = os.environ.get(CONFIG_JSON_ENV)
    if not text:
        raise SystemExit(f"no engine config: pass --config or set {CONFIG_JSON_ENV}")
    return EngineConfig.model_validate_json(text)


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
    parser.add_argument("--config", type=Path, default=None, help="the engine config (JSON)")
    args = parser.parse_args(argv)
    logs.configure()
    asyncio.run(serve(load_config(args.config)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
