"""The research library as an MCP tool server: the official ``mcp`` SDK over streamable HTTP.

The retriever agent's model calls its one tool, ``lookup(topic)``, which answers the facts
the library holds on the topic, strongest first, one per line with its source. The topic is
an enum in the tool's schema: the local model's tool call is grammar-constrained by that
schema, so even a 135M-parameter model can only name a topic the library knows.

    python library.py --host 127.0.0.1 --port 18081     # MCP at http://127.0.0.1:18081/mcp

Beside ``/mcp`` it answers ``GET /healthz`` (the readiness probe) and ``GET /calls`` (how
many times each tool ran since the server started, as JSON), so you can see the agents use it.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Literal

from mcp.server.mcpserver import MCPServer
from mcp_types import ToolAnnotations
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

Topic = Literal["jetstream", "kubernetes"]

# (claim, source, weight): what the library knows, by topic.
LIBRARY: dict[str, list[tuple[str, str, int]]] = {
    "jetstream": [
        ("JetStream persists messages in streams", "nats-docs", 3),
        ("Consumers track delivery and acknowledgement", "nats-docs", 2),
        ("KV buckets are streams with per-key history", "nats-docs", 2),
        ("Messages can carry a per-message TTL since 2.11", "release-notes", 1),
    ],
    "kubernetes": [
        ("Controllers reconcile desired and observed state", "k8s-docs", 3),
        ("Custom resources extend the API", "k8s-docs", 2),
        ("Pod Security admission enforces profiles per namespace", "k8s-docs", 1),
    ],
}

server: MCPServer[object] = MCPServer(
    "research-library",
    instructions="Facts on the topics the research team covers.",
    log_level="WARNING",
)
calls: Counter[str] = Counter()


def facts(topic: str) -> str:
    """The library's facts on ``topic``, strongest first: ``claim (source)`` per line."""
    ranked = sorted(LIBRARY[topic], key=lambda fact: -fact[2])
    return "\n".join(f"{claim} ({source})" for claim, source, _ in ranked)


@server.tool(annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True))
def lookup(topic: Topic) -> str:
    """Look up the facts the library holds on a topic, strongest first, with their sources."""
    calls["lookup"] += 1
    return facts(topic)


@server.custom_route("/healthz", methods=["GET"])  # type: ignore[untyped-decorator]
async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


@server.custom_route("/calls", methods=["GET"])  # type: ignore[untyped-decorator]
async def tool_calls(request: Request) -> Response:
    return JSONResponse(dict(calls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18081)
    args = parser.parse_args()
    # Stateless: no session outlives a request, so a restarted server (or a restarted agent)
    # needs no new handshake.
    server.run("streamable-http", host=args.host, port=args.port, stateless_http=True)


if __name__ == "__main__":
    main()
