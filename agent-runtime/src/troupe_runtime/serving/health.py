"""``/healthz``, ``/readyz`` and ``/metrics`` on one port, with a tiny HTTP/1.1 responder.

Probes and scrapes send one small GET; a full web framework is not needed.
Every response closes its connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from troupe_runtime.contract import pod

logger = logging.getLogger(__name__)

READ_TIMEOUT_SECONDS = 5.0
MAX_REQUEST_HEAD_BYTES = 8192


def _response(status: str, body: bytes, content_type: str = "text/plain") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class HealthServer:
    """Serves liveness (the loop answers), readiness (``ready()``) and metrics."""

    def __init__(self, registry: CollectorRegistry, ready: Callable[[], bool]) -> None:
        self._registry = registry
        self._ready = ready
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def respond(self, path: str) -> bytes:
        if path == pod.HEALTH_PATH:
            return _response("200 OK", b"ok\n")
        if path == pod.READY_PATH:
            if self._ready():
                return _response("200 OK", b"ready\n")
            return _response("503 Service Unavailable", b"not ready\n")
        if path == pod.METRICS_PATH:
            return _response("200 OK", generate_latest(self._registry), CONTENT_TYPE_LATEST)
        return _response("404 Not Found", b"not found\n")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_SECONDS)
            parts = head[:MAX_REQUEST_HEAD_BYTES].split(b" ", 2)
            if len(parts) < 3 or parts[0] not in (b"GET", b"HEAD"):
                writer.write(_response("400 Bad Request", b"GET only\n"))
            else:
                writer.write(self.respond(parts[1].decode(errors="replace").split("?", 1)[0]))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            logger.debug("health request dropped", exc_info=True)
        finally:
            writer.close()
