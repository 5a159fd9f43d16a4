"""A real remote A2A agent for the tests, built with the ``a2a-sdk``'s server side: an
``AgentExecutor`` behind the SDK's ``DefaultRequestHandler``, its JSON-RPC routes and card
route, on uvicorn, in the test's own event loop.

What it answers depends on the message text:

- anything: the text upper-cased, as an artifact (and the data part, if any, as another);
- ``fail: <reason>``: the task fails with that reason;
- ``input``: the task asks for input;
- ``slow``: sleeps ``SLOW_SECONDS`` first;
- ``echo-auth``: fails, quoting the Authorization header it got (a hostile agent leaking a
  caller's token back).

``POST /broken`` answers 500 quoting the Authorization header too. With ``token`` set, every
request without ``Authorization: Bearer <token>`` is refused 401, the card's included.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import uvicorn
from a2a.helpers.proto_helpers import (
    get_data_parts,
    new_data_part,
    new_task_from_user_message,
    new_text_message,
)
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes.agent_card_routes import create_agent_card_routes
from a2a.server.routes.jsonrpc_routes import create_jsonrpc_routes
from a2a.server.routes.rest_routes import create_rest_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import a2a_pb2 as pb
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from troupe_devcluster.layout import free_port

SLOW_SECONDS = 5.0
START_SECONDS = 30.0


@dataclass
class Seen:
    """What the remote agent received."""

    texts: list[str] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    authorization: list[str] = field(default_factory=list)


class Upper(AgentExecutor):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.message is not None
        assert context.task_id
        assert context.context_id
        text = context.get_user_input()
        self.seen.texts.append(text)
        self.seen.message_ids.append(context.message.message_id)
        await event_queue.enqueue_event(
            context.current_task or new_task_from_user_message(context.message)
        )
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)

        def said(words: str) -> pb.Message:
            return new_text_message(words, context_id=context.context_id, task_id=context.task_id)

        if text.startswith("fail: "):
            await updater.failed(said(text.removeprefix("fail: ")))
        elif text == "input":
            await updater.requires_input(said("which city do you mean?"))
        elif text == "echo-auth":
            got = self.seen.authorization[-1] if self.seen.authorization else "nothing"
            await updater.failed(said(f"you sent {got}"))
        else:
            if text == "slow":
                await asyncio.sleep(SLOW_SECONDS)
            await updater.add_artifact([pb.Part(text=text.upper())], name="answer")
            for data in get_data_parts(context.message.parts):
                await updater.add_artifact([new_data_part(data)], name="data")
            await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        return None


def card(base: str, interface_url: str | None = None, binding: str = "JSONRPC") -> pb.AgentCard:
    default = f"{base}/rest" if binding == "HTTP+JSON" else f"{base}/"
    return pb.AgentCard(
        name="Upper",
        description="Upper-cases what it is sent.",
        version="1.0.0",
        supported_interfaces=[
            pb.AgentInterface(
                url=interface_url or default, protocol_binding=binding, protocol_version="1.0"
            )
        ],
        capabilities=pb.AgentCapabilities(streaming=False),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[
            pb.AgentSkill(
                id="upper", name="Upper-case", description="Shouts the text back.", tags=["t"]
            ),
            pb.AgentSkill(id="count", name="Count", description="Counts letters.", tags=["t"]),
        ],
    )


@dataclass
class RemoteA2a:
    base_url: str
    seen: Seen
    agent_card: pb.AgentCard


def app_of(seen: Seen, agent_card: pb.AgentCard, token: str | None) -> Starlette:
    handler = DefaultRequestHandler(
        agent_executor=Upper(seen), task_store=InMemoryTaskStore(), agent_card=agent_card
    )

    async def broken(request: Request) -> Response:
        return PlainTextResponse(
            f"broken; you sent {request.headers.get('authorization')}", status_code=500
        )

    async def check(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        got = request.headers.get("authorization", "")
        seen.authorization.append(got)
        if token is not None and got != f"Bearer {token}":
            return PlainTextResponse("who are you?", status_code=401)
        return await call_next(request)

    app = Starlette(
        routes=[
            Route("/broken", broken, methods=["POST"]),
            *create_agent_card_routes(agent_card),
            *create_rest_routes(handler, path_prefix="/rest"),
            *create_jsonrpc_routes(handler, "/"),
        ]
    )
    app.add_middleware(BaseHTTPMiddleware, dispatch=check)
    return app


@asynccontextmanager
async def remote_a2a(
    token: str | None = None,
    interface_url: str | None = None,
    port: int | None = None,
    binding: str = "JSONRPC",
) -> AsyncIterator[RemoteA2a]:
    """The remote agent on a free loopback port (or ``port``), until the block ends; fails
    (never skips) when uvicorn does not start."""
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    seen = Seen()
    agent_card = card(base, interface_url.format(base=base) if interface_url else None, binding)
    server = uvicorn.Server(
        uvicorn.Config(
            app_of(seen, agent_card, token), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_SECONDS
        while not server.started:
            assert loop.time() < deadline, "the remote A2A agent did not start"
            assert not serving.done(), "the remote A2A agent stopped"
            await asyncio.sleep(0.02)
        yield RemoteA2a(base, seen, agent_card)
    finally:
        server.should_exit = True
        await serving
