"""Health that tells the truth: a connection the server closed is reopened, and a runtime
that cannot process messages stops reporting live."""

from __future__ import annotations

import asyncio
import os
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
    make_config,
    output_stream,
    provisioned,
    running,
    sample,
    send,
    stream_count,
)
from troupe_devcluster.components import venv_bin
from troupe_devcluster.layout import free_port
from troupe_runtime.agent.context import Context
from troupe_runtime.contract import pod
from troupe_runtime.contract.agent_config import RuntimeConfig

REPOSITORY = Path(__file__).resolve().parents[2]


@contextmanager
def agent_process(
    config: RuntimeConfig, workdir: Path, *arguments: str
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m troupe_runtime.agent`` as the container runs it; killed at the end."""
    config_file = workdir / "config.json"
    config_file.write_text(config.to_json())
    env = {**os.environ, EFFECTS_ENV: str(workdir / "effects"), pod.POD_IP_ENV: "127.0.0.1"}
    command = [sys.executable, *pod.AGENT_COMMAND[1:], "--config", str(config_file), *arguments]
    with (workdir / "runtime.log").open("ab") as log:
        process = subprocess.Popen(
            command, cwd=REPOSITORY, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@contextmanager
def private_nats(workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A JetStream nats-server of this test's own, which it may kill."""
    port = free_port()
    command = [str(venv_bin() / "nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(
        [*command, "-sd", str(workdir / "jetstream")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"nats://127.0.0.1:{port}", process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


async def ready(config: RuntimeConfig) -> bool:
    return await status(config, pod.READY_PATH) == 200


async def status(config: RuntimeConfig, path: str) -> int | None:
    try:
        return (await http_get(config.health_port, path)).status_code
    except httpx.TransportError:
        return None


async def failing(config: RuntimeConfig) -> bool:
    return await status(config, pod.HEALTH_PATH) == 503


async def answers(url: str) -> bool:
    """Whether the server accepts connections (a TCP connect, to keep nats-py out of it)."""
    host, port = url.removeprefix("nats://").split(":")
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def echo(ctx: Context) -> object:
    return ctx.event.data


async def test_a_connection_the_server_closed_is_reopened_and_the_next_message_processed(
    nats_url: str,
) -> None:
    config = make_config(nats_url)
    async with provisioned(config) as (_, js), running(config, echo) as runtime:
        connection = runtime._nc
        assert connection is not None
        assert connection._transport is not None
        # A publish over max_payload, as the server sees it: it answers with an error
        # and closes the connection, and nats-py gives that connection up for good.
        connection._transport.write(f"PUB x {connection.max_payload + 1}\r\n".encode())
        await eventually(lambda: connection.is_closed, "the server to close the connection")
        await eventually(runtime.ready, "the runtime to be ready again")
        await send(js, config, "after the close")
        await eventually(lambda: stream_count(js, output_stream(config)), "the next output")
        reopened = sample(runtime, "troupe_nats_reopened_total", cause="closed")
        healthz = await http_get(runtime.health.port, pod.HEALTH_PATH)

    assert runtime._nc is not connection
    assert reopened == 1
    assert healthz.status_code == 200


async def test_a_runtime_that_cannot_reach_nats_past_the_bound_stops_reporting_live(
    tmp_path: Path,
) -> None:
    with private_nats(tmp_path) as (url, server):
        await eventually(lambda: answers(url), "the private nats-server")
        config = make_config(url, healthPort=free_port())
        async with provisioned(config):
            pass
        with agent_process(config, tmp_path, "--liveness-bound", "1") as process:
            await eventually(lambda: ready(config), "the runtime to be ready")
            live_before = await status(config, pod.HEALTH_PATH)
            server.kill()
            server.wait()
            await eventually(lambda: failing(config), "/healthz to fail", within=15)
            readyz = await status(config, pod.READY_PATH)
            alive = process.poll() is None

    assert live_before == 200
    assert readyz == 503
    assert alive


async def test_a_fetch_loop_that_ended_is_started_again_on_a_new_connection(
    nats_url: str,
) -> None:
    config = make_config(nats_url)
    async with provisioned(config) as (_, js), running(config, echo) as runtime:
        fetching = runtime._fetching
        assert fetching is not None
        fetching.cancel()  # as if the loop had died of something it did not catch
        await eventually(
            lambda: sample(runtime, "troupe_nats_reopened_total", cause="fetch_loop"),
            "the session to be reopened",
        )
        await eventually(runtime.ready, "the runtime to be ready again")
        await send(js, config, "after the loop ended")
        await eventually(lambda: stream_count(js, output_stream(config)), "the next output")

    assert runtime._fetching is not fetching
