"""Benchmark: the gateway's added latency for a blocking A2A SendMessage, against publishing
the same call straight to the Agent's inbox and waiting for its reply, in the same run.

One nats-server. The Agent is the runtime's echo agent (in this process, as
``runtime_echo.py`` runs it), its inbox and the namespace's event log provisioned as the
operator provisions them, its directory entry written into the directory bucket by hand.

- Baseline: a bare nats-py client subscribes to the call's reply subject
  (``naming.gateway_reply_subject``), publishes the very message the gateway would
  (``contract.gateway.call_message``: the CloudEvent with ``replyto``, ``Nats-Msg-Id`` = task
  id) and waits until JetStream stored it, then waits for the reply.
- Troupe: a JSON-RPC ``SendMessage`` (blocking) posted with ``httpx`` on one kept-alive
  connection to the gateway's app, served by uvicorn in a subprocess of its own (this script
  with ``--serve-gateway``), which answers with the completed task.

Auth: the gateway runs the real ``KubernetesAuthorizer`` with the API server stood in (every
TokenReview and SubjectAccessReview admitted, answered in memory): its caches keep an answer
10 to 30 s, so a steady run measures their hits, and no cluster is started. Samples
alternate between the two, so both see the same machine; the first ``--warmup`` of each
are dropped.

Run: ``make bench BENCH=gateway_overhead [ARGS="--calls 300 --warmup 50"]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import nats
import uvicorn
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from troupe_gateway.app import build_app
from troupe_gateway.auth import KubernetesAuthorizer
from troupe_gateway.calls import Calls
from troupe_gateway.directory import Directory
from troupe_gateway.kube import Review
from troupe_gateway.services import Services
from troupe_gateway.settings import Settings

from troupe_devcluster import launcher
from troupe_devcluster.layout import free_port
from troupe_runtime.agent.handlers import LoadedHandler
from troupe_runtime.agent.handlers.echo import echo
from troupe_runtime.agent.runtime import Runtime
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.agent_resources import build_agent_resources
from troupe_runtime.contract.gateway import DirectoryEntry, TaskRecord, call_message
from troupe_runtime.nats.provision import ensure_agent_resources
from troupe_runtime.nats.publish import publish_stored

AGENT = "echo"
TEXT = "hello"
"""What each call sends: an A2A text part; the input the gateway makes of it, as is."""
START_SECONDS = 60.0
CALL_SECONDS = 30.0
STOP_SECONDS = 15.0


class AdmittingApiServer:
    """The API server as the gateway's ``Kube`` sees it, admitting every caller."""

    async def token_review(self, token: str, audiences: tuple[str, ...] = ()) -> Review:
        return Review(ok=True, user="bench", groups=("system:authenticated",), uid="bench")

    async def access_review(self, user: str, groups: tuple[str, ...], **what: Any) -> Review:
        return Review(ok=True)

    async def aclose(self) -> None:
        return None


async def serve_gateway(nats_url: str, port: int) -> None:
    """The gateway's app as ``python -m troupe_gateway`` builds it, the API server stood in."""
    settings = Settings(nats_url=nats_url, host="127.0.0.1", port=port)
    nc = await nats.connect(nats_url, name="troupe-gateway")
    js = nc.jetstream()
    directory = Directory(js)
    kube: Any = AdmittingApiServer()
    services = Services(
        nc=nc,
        js=js,
        calls=Calls(nc, js, settings.task_ttl_seconds),
        directory=directory,
        authorizer=KubernetesAuthorizer(kube),
        kube=kube,
        settings=settings,
    )
    config = uvicorn.Config(build_app(services), host=settings.host, port=port, log_level="warning")
    server = uvicorn.Server(config)

    async def until_told() -> None:
        await asyncio.to_thread(sys.stdin.read)  # the bench closes our stdin: stop
        server.should_exit = True

    told = asyncio.create_task(until_told())
    try:
        await server.serve()
    finally:
        told.cancel()
        await directory.aclose()
        await asyncio.sleep(0.1)  # the directory's watch ends before its connection
        await nc.close()


@contextmanager
def gateway_process(nats_url: str, profile: str | None) -> Iterator[str]:
    """The gateway in a subprocess of its own (under cProfile into ``profile``, when
    given): its base URL."""
    port = free_port()
    profiling = ["-m", "cProfile", "-o", profile] if profile else []
    script = os.path.abspath(__file__)
    process = subprocess.Popen(
        [sys.executable, *profiling, script, "--serve-gateway", nats_url, str(port)],
        stdin=subprocess.PIPE,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        assert process.stdin is not None
        process.stdin.close()  # a clean stop, so that cProfile writes its file
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


async def provision(js: JetStreamContext, nats_url: str) -> tuple[RuntimeConfig, DirectoryEntry]:
    """An echo agent in a namespace of its own, provisioned as the operator does, and its
    directory entry."""
    config = RuntimeConfig.model_validate(
        {"agent": AGENT, "namespace": f"bench{uuid.uuid4().hex[:8]}", "nats": {"url": nats_url}}
    )
    await ensure_agent_resources(js, build_agent_resources(config))
    entry = DirectoryEntry(
        kind="Agent",
        namespace=config.namespace,
        name=AGENT,
        subject=config.inbox_subject(0),
        description="Echoes",
        ready=True,
    )
    kv = await js.create_key_value(KeyValueConfig(bucket=naming.directory_bucket(entry.namespace)))
    await kv.put(
        naming.directory_key("Agent", AGENT), entry.model_dump_json(by_alias=True).encode()
    )
    return config, entry


async def bare_call(nc: Client, js: JetStreamContext, entry: DirectoryEntry) -> float:
    """One call published straight to the inbox, the reply awaited: seconds."""
    started = time.perf_counter()
    task_id = uuid.uuid4().hex
    record = TaskRecord(
        task_id=task_id,
        kind="Agent",
        name=entry.name,
        context_id=task_id,
        created_at=datetime.now(UTC),
        caller="bench",
        input=TEXT,
    )
    subject, headers, payload = call_message(entry, record)
    subscription = await nc.subscribe(naming.gateway_reply_subject(entry.namespace, task_id))
    try:
        await publish_stored(js, subject, payload, headers)
        await subscription.next_msg(timeout=CALL_SECONDS)
    finally:
        await subscription.unsubscribe()
    return time.perf_counter() - started


async def gateway_call(http: httpx.AsyncClient, url: str) -> float:
    """One blocking JSON-RPC SendMessage through the gateway: seconds."""
    message_id = uuid.uuid4().hex
    body = {
        "jsonrpc": "2.0",
        "id": message_id,
        "method": "SendMessage",
        "params": {
            "message": {"messageId": message_id, "role": "ROLE_USER", "parts": [{"text": TEXT}]}
        },
    }
    started = time.perf_counter()
    response = await http.post(url, json=body)
    elapsed = time.perf_counter() - started
    answer = response.json()
    state = answer.get("result", {}).get("task", {}).get("status", {}).get("state")
    if response.status_code != 200 or state != "TASK_STATE_COMPLETED":
        raise RuntimeError(f"the gateway answered {response.status_code}: {answer}")
    return elapsed


async def gateway_ready(http: httpx.AsyncClient, base: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while True:
        try:
            if (await http.get(base + "/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway did not start within {START_SECONDS:g}s")
        await asyncio.sleep(0.1)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def bench(nats_url: str, calls: int, warmup: int, profile: str | None) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    config, entry = await provision(js, nats_url)
    runtime = Runtime(config, handler=LoadedHandler(echo), host="127.0.0.1", port=0)
    running = asyncio.create_task(runtime.run())
    samples: dict[str, list[float]] = {"bare nats-py": [], "gateway A2A": []}
    try:
        deadline = time.monotonic() + START_SECONDS
        while not runtime.ready():
            if time.monotonic() > deadline or running.done():
                raise RuntimeError("the echo agent did not become ready")
            await asyncio.sleep(0.02)
        with gateway_process(nats_url, profile) as base:
            url = f"{base}/a2a/{entry.namespace}/agents/{AGENT}"
            headers = {"Authorization": "Bearer bench-token", "A2A-Version": "1.0"}
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            async with httpx.AsyncClient(
                headers=headers, timeout=CALL_SECONDS, limits=limits
            ) as http:
                await gateway_ready(http, base)
                loads = [os.getloadavg()[0]]
                for index in range(warmup + calls):
                    if index % 2:  # alternate which goes first
                        bare_s = await bare_call(nc, js, entry)
                        through_s = await gateway_call(http, url)
                    else:
                        through_s = await gateway_call(http, url)
                        bare_s = await bare_call(nc, js, entry)
                    if index >= warmup:
                        samples["bare nats-py"].append(bare_s)
                        samples["gateway A2A"].append(through_s)
                loads.append(os.getloadavg()[0])
    finally:
        runtime.stop()
        await asyncio.wait({running}, timeout=STOP_SECONDS)
        if not running.done():
            # Python 3.11's wait_for can swallow a cancel that meets a pull's answer, and
            # the runtime's dead-letter rescuer then pulls on: cancelled again, it ends.
            logging.warning("the echo agent did not stop in %gs; cancelling it", STOP_SECONDS)
            running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await nc.close()

    print(
        "blocking A2A SendMessage through the gateway vs a bare publish to the inbox and "
        f"its reply; {calls} calls each, interleaved, after {warmup} warm-up; "
        f"load {loads[0]:.1f}-{loads[1]:.1f}"
    )
    print("gateway: uvicorn in a subprocess, httpx JSON-RPC on one kept-alive connection;")
    print("auth: KubernetesAuthorizer with the API server stood in (admits everyone, cached)")
    print(f"{'':14} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
    for name, values in samples.items():
        p50, p90, p99 = (percentile(values, f) * 1e3 for f in (0.5, 0.9, 0.99))
        mean = statistics.fmean(values) * 1e3
        print(f"{name:14} {p50:9.3f} {p90:9.3f} {p99:9.3f} {mean:9.3f}")
    bare, through = samples["bare nats-py"], samples["gateway A2A"]
    for label, fraction in (("p50", 0.5), ("p99", 0.99)):
        added = (percentile(through, fraction) - percentile(bare, fraction)) * 1e3
        ratio = percentile(through, fraction) / percentile(bare, fraction)
        print(f"added at {label}: {added:+.3f} ms, ratio gateway/bare {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--profile", metavar="PATH", help="profile the gateway process with cProfile into PATH"
    )
    parser.add_argument(
        "--serve-gateway", nargs=2, metavar=("NATS_URL", "PORT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.serve_gateway:
        nats_url, port = args.serve_gateway
        asyncio.run(serve_gateway(nats_url, int(port)))
        return
    layout = launcher.up_nats()
    try:
        asyncio.run(bench(layout.nats_url, args.calls, args.warmup, args.profile))
    finally:
        launcher.down(layout)


if __name__ == "__main__":
    main()
