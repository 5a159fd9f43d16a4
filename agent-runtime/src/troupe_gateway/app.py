"""The gateway's routes: health, readiness and metrics, then every front end's.

Each front end module exposes ``routes(services)`` and may expose ``lifespan(services)``;
adding one is a line in ``FRONT_ENDS``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from types import ModuleType

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from troupe_gateway import a2a_server, mcp_server, plain, relay, webhooks
from troupe_gateway.auth import Refused
from troupe_gateway.calls import CallRefused
from troupe_gateway.services import Services

FRONT_ENDS: tuple[ModuleType, ...] = (a2a_server, mcp_server, plain, webhooks, relay)


def build_app(services: Services) -> Starlette:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if services.nc.is_connected:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "NATS is not connected"}, status_code=503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    for module in FRONT_ENDS:
        routes.extend(module.routes(services))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for module in FRONT_ENDS:
                if hasattr(module, "lifespan"):
                    await stack.enter_async_context(module.lifespan(services))
            yield

    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={Refused: _refused, CallRefused: _call_refused},
    )


async def _refused(request: Request, error: Exception) -> Response:
    """401/403/503 with the reason (never the credential); 401 says how to authenticate."""
    assert isinstance(error, Refused)
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(
        {"error": error.reason, "reason": error.reason}, status_code=error.status, headers=headers
    )


async def _call_refused(request: Request, error: Exception) -> Response:
    assert isinstance(error, CallRefused)
    return JSONResponse({"error": error.reason, "reason": error.reason}, status_code=error.status)
