"""MCP over streamable HTTP: every Agent and Workflow of a namespace is a tool of
``/mcp/{namespace}``, served by the official ``mcp`` SDK (its low-level ``Server`` and its
session manager).

**Stateless.** The session manager runs in stateless mode: no ``Mcp-Session-Id``, a fresh
transport per request, so any replica serves any request and a replica's death loses no
session. A call is a task (``Calls.submit``) waited for up to ``CALL_WAIT_SECONDS`` (a
caller may ask for less with ``_meta["dev.troupe/timeout"]``, seconds); ``mcp_tools`` says
what a tool and its result look like.

**Auth on every request.** Each HTTP request is authenticated before the SDK sees it: no or
bad credentials answer 401 with ``WWW-Authenticate: Bearer`` and a JSON-RPC error body,
``initialize`` and ``tools/list`` included. ``tools/list`` lists only the tools the caller
may invoke (a SubjectAccessReview per object, cached by the authorizer): as for the other
front ends, nobody learns what exists before RBAC lets them call it, and a model is never
offered a tool it would be refused. ``tools/call`` goes through ``Services.admit`` (RBAC
before lookup): a refusal is a JSON-RPC error (``FORBIDDEN``, data ``{"status": 403}``; an
unknown tool ``INVALID_PARAMS``, ``{"status": 404}``) and nothing is published. An input the
contract refuses is an error *result*, as MCP asks, so a model can correct its call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    CallToolRequestParams,
    CallToolResult,
    ListToolsResult,
    PaginatedRequestParams,
)
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from troupe_gateway import mcp_tools
from troupe_gateway.auth import Caller, Refused, Resource
from troupe_gateway.calls import CallRefused
from troupe_gateway.services import Services
from troupe_runtime.contract import grammar
from troupe_runtime.contract.gateway import DirectoryEntry, TargetKind
from troupe_runtime.contract.version import VERSION

PATH: Final = "/mcp/{namespace}"
CALL_WAIT_SECONDS: Final = 240.0
"""How long a tool call waits for its task: under the SDK client's 300 s SSE read timeout."""
TIMEOUT_META_KEY: Final = f"{mcp_tools.META_PREFIX}timeout"
FORBIDDEN: Final = -32003
"""The JSON-RPC error code of an RBAC refusal (a server-defined code, -32000 to -32099)."""
AUTHORIZE_CONCURRENCY: Final = 16
"""SubjectAccessReviews in flight at once while listing."""
ADMITTED: Final = "troupe.mcp.admitted"
"""The ASGI scope key where the authenticated caller travels to the handlers."""

_NAMESPACE = re.compile(grammar.DNS_LABEL_PATTERN)
_RESOURCES: Final[dict[str, Resource]] = {"Agent": "agents", "Workflow": "workflows"}


@dataclass(frozen=True)
class Admitted:
    namespace: str
    caller: Caller


def wait_seconds(meta: Mapping[str, Any] | None) -> float:
    """The caller's ``_meta`` timeout when it is a number in (0, ``CALL_WAIT_SECONDS``],
    else ``CALL_WAIT_SECONDS``."""
    asked = (meta or {}).get(TIMEOUT_META_KEY)
    if isinstance(asked, bool) or not isinstance(asked, int | float):
        return CALL_WAIT_SECONDS
    if not math.isfinite(asked) or asked <= 0:
        return CALL_WAIT_SECONDS
    return min(float(asked), CALL_WAIT_SECONDS)


async def _answer(
    send: Send, status: int, message: str, headers: Mapping[str, str] | None = None
) -> None:
    """A refusal before the SDK: a JSON-RPC error without an id, as the SDK's own are."""
    error = {"code": INVALID_REQUEST, "message": message}
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class McpFrontEnd:
    """One SDK server and one stateless session manager per gateway process."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.server: Server[Any] = Server(
            "troupe-gateway",
            version=VERSION,
            title="Troupe",
            description="Troupe's Agents and Workflows of one namespace, as tools.",
            on_list_tools=self.list_tools,
            on_call_tool=self.call_tool,
        )
        self.manager = StreamableHTTPSessionManager(
            self.server,
            stateless=True,
            # The gateway is reached through a Service, under any host name; every request
            # carries credentials, so DNS rebinding gains a page nothing.
            security_settings=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Authenticate, then hand the request to the SDK with the caller in its scope."""
        namespace = str(scope.get("path_params", {}).get("namespace", ""))
        if len(namespace) > grammar.DNS_LABEL_MAX or not _NAMESPACE.match(namespace):
            await _answer(send, 404, "not found: a namespace is a DNS label")
            return
        try:
            caller = await self.services.authorizer.authenticate(Headers(scope=scope), namespace)
        except Refused as refusal:
            challenge = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else {}
            words = "unauthorized" if refusal.status == 401 else "forbidden"
            await _answer(send, refusal.status, f"{words}: {refusal.reason}", challenge)
            return
        scope[ADMITTED] = Admitted(namespace, caller)
        await self.manager.handle_request(scope, receive, send)

    @staticmethod
    def _admitted(ctx: ServerRequestContext[Any]) -> tuple[Admitted, Request]:
        request = ctx.request
        admitted = request.scope.get(ADMITTED) if isinstance(request, Request) else None
        if not isinstance(admitted, Admitted) or not isinstance(request, Request):
            raise MCPError(INTERNAL_ERROR, "the request was not authenticated")
        return admitted, request

    async def _invocable(self, admitted: Admitted, entry: DirectoryEntry) -> bool:
        try:
            await self.services.authorizer.authorize(
                admitted.caller, admitted.namespace, _RESOURCES[entry.kind], entry.name
            )
        except Refused:
            return False
        return True

    async def list_tools(
        self, ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        admitted, _ = self._admitted(ctx)
        entries = await self.services.directory.entries(admitted.namespace)
        room = asyncio.Semaphore(AUTHORIZE_CONCURRENCY)

        async def allowed(entry: DirectoryEntry) -> bool:
            async with room:
                return await self._invocable(admitted, entry)

        tools = [mcp_tools.tool_for(entry) for entry in entries]
        offered = [(entry, tool) for entry, tool in zip(entries, tools, strict=True) if tool]
        verdicts = await asyncio.gather(*(allowed(entry) for entry, _ in offered))
        listed = [tool for (_, tool), ok in zip(offered, verdicts, strict=True) if ok]
        return ListToolsResult(tools=sorted(listed, key=lambda tool: tool.name))

    async def _target(self, namespace: str, tool: str) -> tuple[TargetKind, str] | None:
        """The kind and name ``tool`` calls; a cut name is looked up in the directory."""
        target = mcp_tools.parse_tool_name(tool)
        if target is None:
            return None
        if target.name is not None:
            return target.kind, target.name
        for entry in await self.services.directory.entries(namespace):
            if entry.kind == target.kind and mcp_tools.is_tool_name(entry, tool):
                return entry.kind, entry.name
        return None

    async def call_tool(
        self, ctx: ServerRequestContext[Any], params: CallToolRequestParams
    ) -> CallToolResult:
        admitted, request = self._admitted(ctx)
        unknown = MCPError(INVALID_PARAMS, f"unknown tool {params.name[:200]!r}", {"status": 404})
        target = await self._target(admitted.namespace, params.name)
        if target is None:
            raise unknown
        kind, name = target
        try:
            caller, entry = await self.services.admit(
                request.headers, admitted.namespace, kind, name
            )
        except Refused as refusal:
            raise MCPError(
                FORBIDDEN, f"forbidden: {refusal.reason}", {"status": refusal.status}
            ) from None
        except CallRefused as refusal:
            if refusal.status == 404:
                raise unknown from None
            raise MCPError(INVALID_REQUEST, refusal.reason, {"status": refusal.status}) from None
        try:
            data = mcp_tools.call_input(entry, params.arguments)
        except mcp_tools.BadArguments as error:
            return mcp_tools.refused_input(entry, str(error))
        try:
            record = await self.services.calls.submit(entry, data, caller=caller.user)
        except CallRefused as refusal:
            if refusal.status == 400:
                return mcp_tools.refused_input(entry, refusal.reason)
            if refusal.status >= 500:
                return mcp_tools.not_started(entry, refusal.reason)
            raise MCPError(INVALID_REQUEST, refusal.reason, {"status": refusal.status}) from None
        within = wait_seconds(params.meta)
        view = await self.services.calls.wait(entry, record.task_id, within)
        return mcp_tools.task_result(entry, view, within)


_FRONT_ENDS: dict[int, tuple[Services, McpFrontEnd]] = {}


def front_end(services: Services) -> McpFrontEnd:
    """The one front end of ``services`` (``routes`` and ``lifespan`` share its manager)."""
    held = _FRONT_ENDS.get(id(services))
    if held is None or held[0] is not services:
        held = (services, McpFrontEnd(services))
        _FRONT_ENDS[id(services)] = held
    return held[1]


def routes(services: Services) -> list[BaseRoute]:
    return [Route(PATH, endpoint=front_end(services), methods=["GET", "POST", "DELETE"])]


@contextlib.asynccontextmanager
async def lifespan(services: Services) -> AsyncIterator[None]:
    """The session manager's task group, where each stateless request's server runs."""
    held = front_end(services)
    try:
        async with held.manager.run():
            yield
    finally:
        _FRONT_ENDS.pop(id(services), None)
