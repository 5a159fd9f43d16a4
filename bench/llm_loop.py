"""Benchmark: the LLM loop's added latency per model call, against a direct httpx call to
the same scripted server, in the same run.

The scripted OpenAI-compatible server (``troupe_devcluster.scripted_llm``) runs in a
subprocess of its own, so its threads take no GIL from the measured process. Troupe: the
real LLM agent handler answers one message with one model call (request built from the
policy, sent through the model client and router, usage counted, the turn appended to the
message's journal on a real nats-server, the answer returned). Baseline: the very request
body the loop sent, posted with a bare ``httpx.AsyncClient`` and read to the end. Samples
alternate between the two, so both see the same machine.

Run: ``make bench BENCH=llm_loop [ARGS="--calls 300"]``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import nats
from nats.js import JetStreamContext

from troupe_devcluster import launcher
from troupe_runtime.agent.context import Context
from troupe_runtime.agent.handlers import LoadedHandler, load_handler
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.agent_resources import build_agent_resources
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.nats.provision import ensure_agent_resources
from troupe_runtime.state.store import StateStore

MODEL = "bench-model"
SERVER = """
import json, sys, threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from troupe_devcluster.scripted_llm import ScriptedLlm, Text

server = ScriptedLlm(models=[sys.argv[2]])
server.script(*[Text("The answer is forty-two.", usage=(24, 6))] * int(sys.argv[1]))


class LastRequest(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(server.completions[-1].body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


side = HTTPServer(("127.0.0.1", 0), LastRequest)
threading.Thread(target=side.serve_forever, daemon=True).start()
print(server.port, side.server_address[1], flush=True)
sys.stdin.read()
"""


@contextmanager
def scripted_server(replies: int) -> Iterator[tuple[str, str]]:
    """A scripted server in a subprocess with ``replies`` answers queued: its base URL, and
    the URL answering the last chat completion request it received."""
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(replies), MODEL],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port, side = process.stdout.readline().split()
        yield f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{side}/last"
    finally:
        process.kill()
        process.wait(timeout=10)


def agent_config(nats_url: str, base_url: str, stream: bool) -> RuntimeConfig:
    """An LLM agent of its own namespace asking the scripted model, no tools, no schema."""
    return RuntimeConfig.model_validate(
        {
            "agent": "bench",
            "namespace": f"bench{uuid.uuid4().hex[:8]}",
            "nats": {"url": nats_url},
            "handler": {"type": "llm"},
            "llm": {
                "policy": {"model": {"provider": "scripted", "model": MODEL}, "stream": stream},
                "providers": [
                    {
                        "name": "scripted",
                        "spec": {"baseUrl": base_url, "models": [{"name": MODEL}]},
                    }
                ],
            },
        }
    )


async def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def context(js: JetStreamContext, config: RuntimeConfig, question: str) -> Context:
    """A first delivery's context, as the runtime builds it for the handler."""
    return Context(
        CloudEvent(id=uuid.uuid4().hex, source="/bench", type="bench.question", data=question),
        attempt=1,
        state=StateStore(js, config),
        logger=logging.getLogger("bench"),
        publisher=_nothing,
        progress=_nothing,
    )


async def loop_call(agent: LoadedHandler, ctx: Context) -> float:
    """One message through the LLM agent (one model call); its latency in seconds."""
    started = time.perf_counter()
    await agent.call(ctx)
    return time.perf_counter() - started


async def direct_call(client: httpx.AsyncClient, base_url: str, body: dict[str, Any]) -> float:
    """One bare httpx call with ``body``, read to the end; its latency in seconds."""
    started = time.perf_counter()
    if body.get("stream"):
        async with client.stream("POST", f"{base_url}/chat/completions", json=body) as response:
            await response.aread()
    else:
        response = await client.post(f"{base_url}/chat/completions", json=body)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


def report(calls: int, direct: list[float], loop: list[float], stream: bool) -> None:
    mode = "streamed (SSE)" if stream else "whole answers"
    print(f"one model call per message, {mode}, {calls} samples each, interleaved")
    print(f"{'':14} {'p50 ms':>9} {'p90 ms':>9} {'mean ms':>9}")
    for name, values in (("direct httpx", direct), ("troupe loop", loop)):
        p50, p90 = percentile(values, 0.5) * 1e3, percentile(values, 0.9) * 1e3
        print(f"{name:14} {p50:9.3f} {p90:9.3f} {statistics.fmean(values) * 1e3:9.3f}")
    for label, fraction in (("p50", 0.5), ("p90", 0.9)):
        base, ours = percentile(direct, fraction), percentile(loop, fraction)
        print(f"added at {label}: {(ours - base) * 1e3:+.3f} ms ({ours / base:.2f}x)")


async def bench(
    nats_url: str, urls: tuple[str, str], calls: int, stream: bool, warmup: int
) -> None:
    base_url, last_url = urls
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    config = agent_config(nats_url, base_url, stream)
    await ensure_agent_resources(js, build_agent_resources(config))
    # The handler as the runtime loads it for handler.type llm with spec.llm.
    agent = load_handler(config.handler, os.environ, config=config)
    await agent.bind(nc, js)
    direct: list[float] = []
    loop: list[float] = []
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            # The loop's own first request is the body the baseline replays.
            await loop_call(agent, context(js, config, "What is the answer?"))
            body = await sent_body(last_url, client)
            for index in range(warmup + calls):
                # Alternate which goes first, so neither always finds a warm connection.
                order = ("direct", "loop") if index % 2 == 0 else ("loop", "direct")
                measured = {}
                for name in order:
                    if name == "direct":
                        measured[name] = await direct_call(client, base_url, body)
                    else:
                        question = context(js, config, "What is the answer?")
                        measured[name] = await loop_call(agent, question)
                if index >= warmup:
                    direct.append(measured["direct"])
                    loop.append(measured["loop"])
    finally:
        await agent.close()
        await nc.close()
    report(calls, direct, loop, stream)


async def sent_body(last_url: str, client: httpx.AsyncClient) -> dict[str, Any]:
    """The body of the last chat completion request the server received."""
    response = await client.get(last_url)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="samples of each (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="pairs not counted (default 30)")
    parser.add_argument(
        "--no-stream", action="store_true", help="ask for whole answers, not SSE streams"
    )
    args = parser.parse_args()
    layout = launcher.up_nats()
    try:
        with scripted_server(2 * (args.calls + args.warmup) + 10) as urls:
            stream = not args.no_stream
            asyncio.run(bench(layout.nats_url, urls, args.calls, stream, args.warmup))
    finally:
        launcher.down(layout)


if __name__ == "__main__":
    main()
