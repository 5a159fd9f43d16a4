"""``python -m troupe_runtime.agent`` as the container runs it: crashes and graceful stops."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.integration.runtime_harness import (
    EFFECTS_ENV,
    eventually,
    http_get,
    inbox_empty,
    make_config,
    output_stream,
    provisioned,
    send,
    stream_count,
)
from troupe_devcluster.layout import free_port
from troupe_runtime.contract import pod
from troupe_runtime.contract.agent_config import RuntimeConfig

REPOSITORY = Path(__file__).resolve().parents[2]
HANDLERS = "tests.integration.runtime_harness"


@contextmanager
def runtime_process(config: RuntimeConfig, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The runtime in a process of its own; killed at the end if still running."""
    config_file = workdir / "config.json"
    config_file.write_text(config.to_json())
    env = {**os.environ, EFFECTS_ENV: str(workdir / "effects"), pod.POD_IP_ENV: "127.0.0.1"}
    with (workdir / "runtime.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, *pod.AGENT_COMMAND[1:], "--config", str(config_file), "--grace", "5"],
            cwd=REPOSITORY,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


async def ready(config: RuntimeConfig) -> bool:
    try:
        return (await http_get(config.health_port, "/readyz")).status_code == 200
    except httpx.TransportError:
        return False


def effects(workdir: Path) -> list[str]:
    path = workdir / "effects"
    return path.read_text().splitlines() if path.exists() else []


async def test_a_message_whose_process_was_killed_is_redelivered_and_its_effect_happens_once(
    nats_url: str, tmp_path: Path
) -> None:
    config = make_config(
        nats_url,
        handler={"type": "python", "entrypoint": f"{HANDLERS}:publish_then_hang_once"},
        messaging={"ackWait": "1s"},
        healthPort=free_port(),
    )
    async with provisioned(config) as (_, js):
        event = await send(js, config, "do it once")
        with runtime_process(config, tmp_path) as first:
            await eventually(lambda: effects(tmp_path), "the first attempt's effect")
            first.send_signal(signal.SIGKILL)
        with runtime_process(config, tmp_path):
            await eventually(lambda: inbox_empty(js, config), "the message to be acknowledged")
        outputs = await stream_count(js, output_stream(config))

    assert effects(tmp_path) == [f"published {event.id} 1", f"published {event.id} 2"]
    assert outputs == 1


async def test_sigterm_finishes_the_message_in_flight_and_exits_zero(
    nats_url: str, tmp_path: Path
) -> None:
    config = make_config(
        nats_url,
        handler={"type": "python", "entrypoint": f"{HANDLERS}:slow_echo"},
        healthPort=free_port(),
    )
    async with provisioned(config) as (_, js):
        with runtime_process(config, tmp_path) as process:
            await eventually(lambda: ready(config), "the runtime to be ready")
            healthz = await http_get(config.health_port, "/healthz")
            event = await send(js, config, "in flight")
            await eventually(lambda: effects(tmp_path), "the handler to start")
            process.send_signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(process.wait, 20)
        outputs = await stream_count(js, output_stream(config))
        acknowledged = await inbox_empty(js, config)

    assert healthz.status_code == 200
    assert effects(tmp_path) == [f"started {event.id} 1"]
    assert exit_code == 0
    assert outputs == 1
    assert acknowledged
