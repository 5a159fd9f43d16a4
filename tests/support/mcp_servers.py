"""A real MCP server for the tests, built with the ``mcp`` SDK (``MCPServer``, streamable HTTP).

Every tool call appends ``<tool> <argument>`` to the effects file (``--effects``), which
survives restarts, so a test sees which tools ran and how often:

- ``record(text)``: records and echoes (not idempotent);
- ``lookup(key)``: marked ``idempotentHint``;
- ``slow(seconds)``: sleeps, for timeouts;
- ``huge(size)``: answers ``size`` characters;
- ``fails(reason)``: answers ``isError``;
- ``picture()``: an image block and a text block;
- ``forbidden()``: for allow lists: a test that allows it not must never see it run;
- ``erase(path)``: marked ``destructiveHint``; ``peek(path)``: marked ``readOnlyHint``.

``--hostile`` serves, with the SDK's low-level ``Server`` instead, a listing in two pages
(``tools/list`` cursors) of tools a client must not trust: a name models refuse, schemas that
are no valid JSON Schema, too large, or use a pattern the runtime cannot run in linear time;
beside ``good`` and ``hinted``, which are fine.

Run ``python -m tests.support.mcp_servers --port P --effects FILE``; the fixture
``McpTestServer`` starts it in a subprocess on a free loopback port and fails, never skips,
when it does not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import (
    CallToolRequestParams,
    CallToolResult,
    ImageContent,
    ListToolsResult,
    PaginatedRequestParams,
    TextContent,
    Tool,
    ToolAnnotations,
)

REPOSITORY = Path(__file__).resolve().parents[2]
START_SECONDS = 30.0


def build_server(effects: Path) -> MCPServer:
    server = MCPServer("troupe-test-tools")

    def effect(tool: str, argument: object) -> None:
        with effects.open("a") as file:
            file.write(f"{tool} {argument}\n")

    @server.tool(description="Records the text and answers it.")
    def record(text: str) -> str:
        effect("record", text)
        return f"recorded {text}"

    @server.tool(
        description="Looks a key up; safe to repeat.",
        annotations=ToolAnnotations(idempotent_hint=True),
    )
    def lookup(key: str) -> str:
        effect("lookup", key)
        return f"value of {key}"

    @server.tool(description="Answers after a while.")
    async def slow(seconds: float) -> str:
        effect("slow", seconds)
        await asyncio.sleep(seconds)
        return "slept"

    @server.tool(description="Answers a very long text.")
    def huge(size: int) -> str:
        effect("huge", size)
        return "x" * size

    @server.tool(description="Always fails.")
    def fails(reason: str) -> str:
        effect("fails", reason)
        raise ToolError(f"failed on purpose: {reason}")

    @server.tool(description="A picture and its caption.", structured_output=False)
    def picture() -> list[ImageContent | TextContent]:
        effect("picture", "-")
        data = base64.b64encode(b"\x89PNG" + bytes(96)).decode()
        return [
            ImageContent(type="image", data=data, mime_type="image/png"),
            TextContent(type="text", text="a caption"),
        ]

    @server.tool(description="Must never run unless allowed.")
    def forbidden() -> str:
        effect("forbidden", "-")
        return "ran"

    @server.tool(
        description="Erases a path: marked destructive.",
        annotations=ToolAnnotations(destructive_hint=True),
    )
    def erase(path: str) -> str:
        effect("erase", path)
        return f"erased {path}"

    @server.tool(
        description="Reads a path: marked read-only.",
        annotations=ToolAnnotations(read_only_hint=True),
    )
    def peek(path: str) -> str:
        effect("peek", path)
        return f"contents of {path}"

    return server


OBJECT: dict[str, Any] = {"type": "object", "properties": {"q": {"type": "string"}}}
HOSTILE_PAGES: list[list[tuple[str, dict[str, Any], ToolAnnotations | None]]] = [
    [("good", OBJECT, None)],
    [
        ("bad.name", OBJECT, None),
        ("not_a_schema", {"type": "object", "properties": {"q": {"type": 7}}}, None),
        ("too_large", {"type": "object", "description": "x" * 100_000}, None),
        ("lookbehind", {"type": "object", "properties": {"q": {"pattern": "(?<=a)b"}}}, None),
        ("hinted", OBJECT, ToolAnnotations(idempotent_hint=True)),
    ],
]


def build_hostile_server(effects: Path) -> Server[Any]:
    async def list_tools(
        ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        page = int(params.cursor) if params is not None and params.cursor else 0
        tools = [
            Tool(name=name, input_schema=schema, annotations=annotations)
            for name, schema, annotations in HOSTILE_PAGES[page]
        ]
        more = str(page + 1) if page + 1 < len(HOSTILE_PAGES) else None
        return ListToolsResult(tools=tools, next_cursor=more)

    async def call_tool(
        ctx: ServerRequestContext[Any], params: CallToolRequestParams
    ) -> CallToolResult:
        with effects.open("a") as file:
            file.write(f"{params.name} -\n")
        return CallToolResult(content=[TextContent(type="text", text=f"{params.name} ran")])

    return Server("troupe-hostile-tools", on_list_tools=list_tools, on_call_tool=call_tool)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class McpTestServer:
    """The test server in a subprocess; ``stop`` and ``start`` again keep its port."""

    def __init__(self, directory: Path, hostile: bool = False) -> None:
        self.hostile = hostile
        self.port = free_port()
        self.effects = directory / "effects.txt"
        self.effects.touch()
        self.log = directory / "mcp-server.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def calls(self, tool: str) -> list[str]:
        """The arguments of each call of ``tool`` so far, in order."""
        lines = self.effects.read_text().splitlines()
        return [line.partition(" ")[2] for line in lines if line.partition(" ")[0] == tool]

    def start(self) -> None:
        command = [sys.executable, "-m", "tests.support.mcp_servers"]
        args = ["--port", str(self.port), "--effects", str(self.effects)]
        args += ["--hostile"] if self.hostile else []
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [*command, *args],
                cwd=REPOSITORY,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        tail = self.log.read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"the MCP test server did not start on port {self.port}:\n{tail}")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.send_signal(signal.SIGKILL)
        self._process.wait(10)
        self._process = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--effects", type=Path, required=True)
    parser.add_argument("--hostile", action="store_true")
    args = parser.parse_args()
    if not args.hostile:
        build_server(args.effects).run("streamable-http", host="127.0.0.1", port=args.port)
        return
    app = build_hostile_server(args.effects).streamable_http_app(host="127.0.0.1")
    uvicorn.run(app, host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()


@pytest.fixture
def mcp_server(tmp_path: Path) -> Iterator[McpTestServer]:
    """The test MCP server, running on a free loopback port; fails if it cannot start."""
    server = McpTestServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hostile_mcp_server(tmp_path: Path) -> Iterator[McpTestServer]:
    """A server listing, in two pages, tools a client must refuse, beside good ones."""
    server = McpTestServer(tmp_path, hostile=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
