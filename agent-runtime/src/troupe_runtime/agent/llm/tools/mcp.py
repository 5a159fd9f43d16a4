"""MCP servers' tools, over streamable HTTP with the official ``mcp`` SDK.

One session per server per process, opened on first need and reused by every message.
A server down at start-up wedges nothing: its tools are missing from ``specs()`` until a
connection succeeds, attempts back off (0.2 s doubling to 10 s), and a call meanwhile is an
error result the model reads. A session that fails (the server restarted, a call timed out
and was abandoned) is dropped; the next call opens a new one at once.

What a server says is hostile input: only tools on the allow list (all, without one) with
a name a model accepts and a bounded object schema are offered; arguments are validated
against that schema before a call; the answer is rendered to text and capped
(``base.MAX_RESULT_BYTES``) before it reaches the loop.

The SDK's session lives inside anyio task groups, which must be entered and left by one
task: each session is held open by a task of its own (``_Session``), and calls race it, so
a session that dies mid-call fails the call at once instead of at its timeout.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import (
    CONNECTION_CLOSED,
    AudioContent,
    CallToolResult,
    EmbeddedResource,
    ImageContent,
    Implementation,
    ResourceLink,
    TextContent,
    TextResourceContents,
    Tool,
)

from troupe_runtime.agent.llm.tools.base import (
    MAX_RESULT_BYTES,
    Parameters,
    ToolNameClash,
    as_text,
    capped,
    description,
    error_result,
    parameters,
    shortened,
)
from troupe_runtime.agent.llm.types import ToolCall, ToolResult, ToolSpec
from troupe_runtime.contract.llm import ResolvedTool
from troupe_runtime.contract.llm_policy import TOOL_NAME_PATTERN, McpServer
from troupe_runtime.contract.tool_approvals import destructive
from troupe_runtime.contract.version import VERSION

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 5.0
"""Connecting, the handshake and listing the tools, together."""
MAX_PAGES = 20
"""Pages of ``tools/list`` followed: a server whose cursor never ends cannot hang start-up."""
MAX_TOOLS = 512
MAX_SSE_EVENT_BYTES = 8 * MAX_RESULT_BYTES
"""An answer larger than the cap must still arrive to be cut (the SDK's default is 1 MiB)."""
CLOSE_SECONDS = 2.0


@dataclass(frozen=True)
class Backoff:
    """Delays between connection attempts to a server that cannot be reached."""

    first: float = 0.2
    most: float = 10.0


DEFAULT_BACKOFF = Backoff()


class Unreachable(Exception):
    """No session with the server now; the message says why and when the next attempt is."""


def _describe(error: BaseException) -> str:
    if isinstance(error, BaseExceptionGroup) and error.exceptions:
        return _describe(error.exceptions[0])
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


@dataclass(frozen=True)
class McpTool:
    """One tool a server listed and the agent may call."""

    server: str
    spec: ToolSpec
    parameters: Parameters
    timeout: float


class _Session:
    """One open SDK client, held by a task of its own until ``close``."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._stop = asyncio.Event()
        self._ready: asyncio.Future[Client] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._hold(), name=f"mcp session {url}")

    async def opened(self) -> Client:
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready), CONNECT_TIMEOUT_SECONDS)
        except TimeoutError:
            self._stop.set()
            await _abandoned(self.task)  # nothing to close politely on a half-open session
            self._settle_ready()
            raise Unreachable(f"no session within {CONNECT_TIMEOUT_SECONDS:g}s") from None

    @property
    def alive(self) -> bool:
        return not self.task.done()

    async def _hold(self) -> None:
        http = create_mcp_http_client(timeout=httpx2.Timeout(CONNECT_TIMEOUT_SECONDS, read=None))
        transport = streamable_http_client(
            self._url, http_client=http, max_sse_event_size=MAX_SSE_EVENT_BYTES
        )
        client_info = Implementation(name="troupe", version=VERSION)
        try:
            async with http, Client(transport, client_info=client_info, cache=None) as client:
                self._ready.set_result(client)
                await self._stop.wait()
        except Exception as error:  # the SDK's and the network's: every one ends this session
            if not self._ready.done():
                self._ready.set_exception(Unreachable(_describe(error)))
            else:
                logger.warning("MCP session with %s ended: %s", self._url, _describe(error))

    async def close(self) -> None:
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), CLOSE_SECONDS)
        except TimeoutError:
            await _abandoned(self.task)
        self._settle_ready()

    def _settle_ready(self) -> None:
        if self._ready.done() and not self._ready.cancelled():
            self._ready.exception()  # retrieved: a failed open is reported by ``opened``
        else:
            self._ready.cancel()


class McpConnection:
    """The tools of one MCP server, and the one session this process keeps with it."""

    def __init__(self, policy: McpServer, url: str, backoff: Backoff = DEFAULT_BACKOFF) -> None:
        self.policy = policy
        self.name = policy.name
        self.url = url
        self.timeout = policy.timeout.total_seconds()
        self.tools: dict[str, McpTool] = {}
        """What the last listing admitted; empty until a session opened once."""
        self._backoff = backoff
        self._delay = backoff.first
        self._retry_at = 0.0
        self._last_error = ""
        self._session: _Session | None = None
        self._client: Client | None = None
        self._lock = asyncio.Lock()
        self._warned: set[str] = set()

    @property
    def connected(self) -> bool:
        return self._session is not None and self._session.alive and self._client is not None

    async def client(self) -> Client:
        """The open session, opening one (and listing the tools) if none is."""
        if self._session is not None and self._session.alive and self._client is not None:
            return self._client
        async with self._lock:
            if self._session is not None and self._session.alive and self._client is not None:
                return self._client
            await self._drop()
            loop = asyncio.get_running_loop()
            if (wait := self._retry_at - loop.time()) > 0:
                raise Unreachable(f"{self._last_error}; the next attempt is in {wait:.1f}s")
            try:
                self._client = await self._open()
            except Unreachable as error:
                if not self._last_error:  # once per outage, not once per message
                    logger.warning(
                        "MCP server %s (%s) is unreachable, its tools are not offered until it "
                        "answers: %s",
                        self.name,
                        self.url,
                        error,
                    )
                self._last_error = str(error)
                self._retry_at = loop.time() + self._delay
                self._delay = min(self._delay * 2, self._backoff.most)
                raise
            if self._last_error:
                logger.info("MCP server %s (%s) answers again", self.name, self.url)
            self._last_error = ""
            self._delay = self._backoff.first
            self._retry_at = 0.0
            return self._client

    async def _open(self) -> Client:
        self._session = _Session(self.url)
        client = await self._session.opened()
        try:
            listed = await asyncio.wait_for(_list_tools(client), CONNECT_TIMEOUT_SECONDS)
        except Exception as error:  # a session that cannot list its tools is of no use
            await self._drop()
            raise Unreachable(f"listing its tools failed: {_describe(error)}") from error
        self.tools = self._admit(listed)
        return client

    def _admit(self, listed: list[Tool]) -> dict[str, McpTool]:
        allow = None if self.policy.allow is None else set(self.policy.allow)
        admitted: dict[str, McpTool] = {}
        for tool in listed:
            if allow is not None and tool.name not in allow:
                continue
            if tool.name in admitted:
                self._warn(tool.name, "is listed twice; the first is kept")
                continue
            if not re.fullmatch(TOOL_NAME_PATTERN, tool.name):
                self._warn(tool.name, f"is not a name models accept ({TOOL_NAME_PATTERN}); skipped")
                continue
            checked = parameters(tool.input_schema)
            if isinstance(checked, str):
                self._warn(tool.name, f"is skipped: {checked}")
                continue
            notes = tool.annotations
            hint = notes is not None and notes.idempotent_hint is True
            spec = ToolSpec(
                name=tool.name,
                description=description(tool.description, f"{tool.name} (MCP server {self.name})"),
                parameters=checked.schema,
                idempotent=hint or tool.name in self.policy.idempotent,
                destructive=notes is None
                or destructive(notes.read_only_hint, notes.destructive_hint),
            )
            admitted[tool.name] = McpTool(self.name, spec, checked, self.timeout)
        for name in sorted((allow or set()) - admitted.keys() - {t.name for t in listed}):
            self._warn(name, "is on the allow list but the server does not list it")
        return admitted

    def _warn(self, tool: str, what: str) -> None:
        if (key := f"{tool}\n{what}") not in self._warned:
            self._warned.add(key)
            logger.warning("MCP server %s (%s): tool %r %s", self.name, self.url, tool, what)

    async def call(self, tool: McpTool, arguments: dict[str, Any]) -> ToolResult:
        """Call ``tool``; every failure is an error result, the session dropped when suspect."""
        try:
            client = await self.client()
        except Unreachable as error:
            return error_result(f"MCP server {self.name} is unreachable: {error}")
        session = self._session
        assert session is not None
        name = tool.spec.name
        call = asyncio.create_task(client.call_tool(name, arguments))
        try:
            done, _ = await asyncio.wait(
                {call, session.task}, timeout=tool.timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:  # the handler's timeout or shutdown: abandon the call
            call.cancel()
            raise
        if call not in done:
            await _abandoned(call)
            await self._drop(session)
            if session.task in done:
                return error_result(f"the session with MCP server {self.name} was lost")
            return error_result(f"tool {name} did not answer within {tool.timeout:g}s")
        try:
            result = call.result()
        except MCPError as error:  # refused (unknown tool, bad params), or the session closed
            if session.alive and error.code != CONNECTION_CLOSED:
                return error_result(f"MCP server {self.name} refused {name}: {error.error.message}")
            await self._drop(session)
            return error_result(f"the session with MCP server {self.name} was lost: {error}")
        except Exception as error:  # the session's: drop it, the next call opens a new one
            await self._drop(session)
            return error_result(
                f"calling {name} on MCP server {self.name} failed: {_describe(error)}"
            )
        return render(result)

    async def _drop(self, session: _Session | None = None) -> None:
        """Close ``session`` (default: the current one) unless another replaced it already."""
        target = session or self._session
        if target is None:
            return
        if target is self._session:
            self._session = None
            self._client = None
        await target.close()

    async def aclose(self) -> None:
        await self._drop()


async def _abandoned(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it ends; whatever it raised is dropped with it."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()


async def _list_tools(client: Client) -> list[Tool]:
    tools: list[Tool] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor or len(tools) >= MAX_TOOLS:
            break
    return tools[:MAX_TOOLS]


def render(result: CallToolResult) -> ToolResult:
    """The result as text for the model: text blocks joined, other blocks as placeholders,
    ``structuredContent`` as JSON when no text block carries it; capped."""
    parts: list[str] = []
    size = 0
    for block in result.content:
        part = _block_text(block)
        parts.append(part)
        size += len(part)
        if size > MAX_RESULT_BYTES:
            break
    has_text = any(isinstance(block, TextContent) for block in result.content)
    if result.structured_content is not None and not has_text:
        parts.append(as_text(result.structured_content))
    return ToolResult(content=capped("\n".join(parts)), is_error=result.is_error)


def _decoded_size(base64: str) -> int:
    return len(base64) * 3 // 4 - base64[-2:].count("=")


def _block_text(block: object) -> str:
    if isinstance(block, TextContent):
        return block.text
    if isinstance(block, ImageContent | AudioContent):
        kind = "image" if isinstance(block, ImageContent) else "audio"
        return f"[{kind}: {shortened(block.mime_type, 100)}, {_decoded_size(block.data)} bytes]"
    if isinstance(block, ResourceLink):
        return f"[resource link: {shortened(str(block.uri), 500)}]"
    if isinstance(block, EmbeddedResource):
        uri = shortened(str(block.resource.uri), 500)
        if isinstance(block.resource, TextResourceContents):
            return f"[resource {uri}]\n{block.resource.text}"
        return f"[resource {uri}: binary, {_decoded_size(block.resource.blob)} bytes]"
    return f"[{type(block).__name__}]"


class McpToolBox:
    """The tools of every MCP server an agent names (``LlmRuntime.mcp``)."""

    def __init__(self, connections: list[McpConnection]) -> None:
        self._connections = connections
        self._index: dict[str, McpTool] = {}
        self._reconnecting: dict[str, asyncio.Task[None]] = {}
        self._reported: set[str] = set()

    @classmethod
    def from_policy(
        cls,
        servers: list[McpServer],
        resolved: list[ResolvedTool],
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> McpToolBox:
        urls = {tool.name: tool.url for tool in resolved}
        connections = []
        for server in servers:
            url = urls.get(server.name) or server.url
            if url is None:
                raise ValueError(
                    f"spec.llm.tools.mcp {server.name!r} has no resolved URL in the runtime "
                    "config; the operator resolves a service reference into one"
                )
            connections.append(McpConnection(server, url, backoff))
        return cls(connections)

    async def start(self) -> None:
        """Try every server once, waiting; a name two servers list is a start-up error."""
        results = await asyncio.gather(
            *(connection.client() for connection in self._connections), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Unreachable):
                raise result
        self._reindex(strict=True)

    def _reindex(self, strict: bool) -> None:
        index: dict[str, McpTool] = {}
        for connection in self._connections:
            for name, tool in connection.tools.items():
                if name in index:
                    clash = (
                        f"tool {name!r} is listed by MCP servers {index[name].server!r} and "
                        f"{connection.name!r}; allow it on one of them only "
                        "(spec.llm.tools.mcp[].allow)"
                    )
                    if strict:
                        raise ToolNameClash(clash)
                    if clash not in self._reported:
                        self._reported.add(clash)
                        logger.error("%s; the first is kept", clash)
                    continue
                index[name] = tool
        self._index = index

    async def specs(self) -> list[ToolSpec]:
        """The tools of the last listing of each server; a server without a session is
        retried in the background, so a slow or unroutable one never holds up a turn."""
        for connection in self._connections:
            if not connection.connected and connection.name not in self._reconnecting:
                task = asyncio.create_task(self._reconnect(connection))
                self._reconnecting[connection.name] = task
        self._reindex(strict=False)
        return [tool.spec for tool in self._index.values()]

    async def _reconnect(self, connection: McpConnection) -> None:
        try:
            await connection.client()
        except Unreachable:
            pass  # reported by the connection, once per outage; backoff holds the next try
        except Exception:  # the SDK's, unforeseen: a background task must not die silently
            logger.exception("reconnecting to MCP server %s failed", connection.name)
        finally:
            self._reconnecting.pop(connection.name, None)

    def has(self, name: str) -> bool:
        return name in self._index

    async def call(self, call: ToolCall, arguments: dict[str, Any]) -> ToolResult:
        tool = self._index.get(call.name)
        if tool is None:
            return error_result(f"{call.name!r} is not a tool of this agent")
        if (problem := tool.parameters.problem(arguments)) is not None:
            return error_result(f"{call.name}: {problem}")
        connection = next(c for c in self._connections if c.name == tool.server)
        return await connection.call(tool, arguments)

    async def aclose(self) -> None:
        for task in list(self._reconnecting.values()):
            await _abandoned(task)
        await asyncio.gather(*(connection.aclose() for connection in self._connections))
