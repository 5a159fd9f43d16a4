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
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext

from tests.integration.runtime_harness import (
    EFFECTS_ENV,
    eventually,
    http_get,
    inbox_empty,
    make_config,
    output_stream,
    provisioned,
    send,
    stored,
    stream_count,
)
from troupe_devcluster.layout import free_port
from troupe_runtime.contract import pod
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.dead_letters import ERROR_HEADER, REASON_HEADER

REPOSITORY = Path(__file__).resolve().parents[2]
HANDLERS = "tests.integration.runtime_harness"
MISBEHAVING = "tests.integration.misbehaving_handlers"


@contextmanager
def runtime_process(
    config: RuntimeConfig, workdir: Path, *arguments: str
) -> Iterator[subprocess.Popen[bytes]]:
    """The runtime in a process of its own; killed at the end if still running."""
    config_file = workdir / "config.json"
    config_file.write_text(config.to_json())
    env = {**os.environ, EFFECTS_ENV: str(workdir / "effects"), pod.POD_IP_ENV: "127.0.0.1"}
    with (workdir / "runtime.log").open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                *pod.AGENT_COMMAND[1:],
                "--config",
                str(config_file),
                "--grace",
                "5",
                *arguments,
            ],
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


async def letters(js: JetStreamContext, config: RuntimeConfig) -> list[tuple[str, str]]:
    """Each dead letter's reason and error, oldest first."""
    if not await stream_count(js, config.dead_letter_stream):
        return []
    return [
        (letter.headers[REASON_HEADER], letter.headers[ERROR_HEADER])
        for letter in await stored(js, config.dead_letter_stream)
        if letter.headers is not None
    ]


async def stuck_threads(config: RuntimeConfig) -> float:
    metrics = (await http_get(config.health_port, "/metrics")).text
    [line] = [
        line for line in metrics.splitlines() if line.startswith("troupe_handler_stuck_threads ")
    ]
    return float(line.split()[1])


@pytest.mark.parametrize(
    ("entrypoint", "data", "error"),
    [
        ("misbehave", "exit", "SystemExit: 3"),
        ("misbehave_in_thread", "interrupt", "KeyboardInterrupt"),
    ],
)
async def test_a_handler_that_exits_fails_its_attempts_and_the_process_keeps_working(
    nats_url: str, tmp_path: Path, entrypoint: str, data: str, error: str
) -> None:
    config = make_config(
        nats_url,
        handler={"type": "python", "entrypoint": f"{MISBEHAVING}:{entrypoint}"},
        retry={"maxAttempts": 2, "backoff": ["50ms"]},
        healthPort=free_port(),
    )
    async with provisioned(config) as (_, js):
        with runtime_process(config, tmp_path) as process:
            await eventually(lambda: ready(config), "the runtime to be ready")
            await send(js, config, data)
            await eventually(lambda: letters(js, config), "the dead letter")
            await send(js, config, "good")
            await eventually(lambda: stream_count(js, output_stream(config)), "the next output")
            alive = process.poll() is None
            still_ready = await ready(config)
        [(reason, text)] = await letters(js, config)

    assert (reason, text.partition(" (")[0]) == ("exhausted", error)
    assert alive
    assert still_ready


def blocking_sync_agent(nats_url: str, **fields: Any) -> RuntimeConfig:
    """An agent whose sync handler blocks on "block" past a 200 ms timeout, with one attempt."""
    return make_config(
        nats_url,
        handler={"type": "python", "entrypoint": f"{MISBEHAVING}:misbehave_in_thread"},
        timeout="200ms",
        retry={"maxAttempts": 1},
        healthPort=free_port(),
        **fields,
    )


async def test_sync_handlers_stuck_past_their_timeout_do_not_starve_the_next_message(
    nats_url: str, tmp_path: Path
) -> None:
    # More stuck calls than a default executor has threads on a small node (cpus + 4).
    blocked = min(32, (os.cpu_count() or 1) + 4) + 1
    config = blocking_sync_agent(nats_url, messaging={"maxInFlight": blocked // 4 + 1})
    async with provisioned(config) as (_, js):
        with runtime_process(config, tmp_path):
            await eventually(lambda: ready(config), "the runtime to be ready")
            for _ in range(blocked):
                await send(js, config, "block")

            async def all_dead_lettered() -> bool:
                return await stream_count(js, config.dead_letter_stream) == blocked

            await eventually(all_dead_lettered, "every blocked message dead-lettered")
            await send(js, config, "good")
            await eventually(lambda: stream_count(js, output_stream(config)), "the good output")
            stuck = await stuck_threads(config)
        reasons = {text.partition(":")[0] for _, text in await letters(js, config)}

    assert reasons == {"HandlerTimeout"}
    assert stuck == blocked


async def test_a_runtime_whose_sync_threads_are_all_stuck_stops_reporting_live(
    nats_url: str, tmp_path: Path
) -> None:
    config = blocking_sync_agent(nats_url, messaging={"maxInFlight": 1})
    async with provisioned(config) as (_, js):
        with runtime_process(config, tmp_path, "--liveness-bound", "1") as process:
            await eventually(lambda: ready(config), "the runtime to be ready")
            live_before = (await http_get(config.health_port, pod.HEALTH_PATH)).status_code
            # Four stuck threads per maxInFlight slot wedge the handler: no call can start.
            for _ in range(4):
                await send(js, config, "block")

            async def not_live() -> bool:
                response = await http_get(config.health_port, pod.HEALTH_PATH)
                return response.status_code == 503

            await eventually(not_live, "/healthz to fail once every thread is stuck")
            stuck = await stuck_threads(config)
            alive = process.poll() is None

    assert live_before == 200
    assert stuck == 4
    assert alive


async def test_sigterm_exits_although_a_sync_handler_thread_is_stuck(
    nats_url: str, tmp_path: Path
) -> None:
    config = blocking_sync_agent(nats_url)
    async with provisioned(config) as (_, js):
        with runtime_process(config, tmp_path) as process:
            await eventually(lambda: ready(config), "the runtime to be ready")
            await send(js, config, "block")
            await eventually(lambda: stream_count(js, config.dead_letter_stream), "the dead letter")
            process.send_signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(wait_for_exit, process, 15)

    assert exit_code == 0


def wait_for_exit(process: subprocess.Popen[bytes], seconds: float) -> int | None:
    try:
        return process.wait(seconds)
    except subprocess.TimeoutExpired:
        return None
