"""``/healthz``, ``/readyz`` and ``/metrics`` on one port, with a tiny HTTP/1.1 responder.

Probes and scrapes send one small GET; a full web framework is not needed.
Every response closes its connection.

Liveness tells the truth: ``/healthz`` fails once the process has been unable
to do its work (its NATS connection down or closed, its fetch loop dead) for
longer than a bound, so Kubernetes restarts it; ``/readyz`` keeps meaning
"ready for traffic now". A process that only waits for what a restart cannot
bring (the operator creating its consumers) stays live.
"""

from __future__ import annotations

import asyncio
import logging
import time
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


class Liveness:
    """Live while ``able()``, and for ``bound`` seconds after it last was.

    Asked at every probe; the time unable is counted from the first probe
    that finds it so, which errs towards a later restart, never a needless one.
    """

    def __init__(
        self,
        able: Callable[[], bool],
        bound: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._able = able
        self._bound = bound
        self._clock = clock
        self._unable_since: float | None = None

    @property
    def bound(self) -> float:
        return self._bound

    def unable_for(self) -> float:
        """Seconds the process has been unable to work, as of now (0 when able)."""
        now = self._clock()
        if self._able():
            self._unable_since = None
            return 0.0
        if self._unable_since is None:
            self._unable_since = now
        return now - self._unable_since

    def __call__(self) -> bool:
        return self.unable_for() <= self._bound


class HealthServer:
    """Serves liveness (``live()``, else: the loop answers), readiness (``ready()``) and metrics."""

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        live: Callable[[], bool] | None = None,
    ) -> None:
        self._registry = registry
        self._ready = ready
        self._live = live
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
            if self._live is None or self._live():
                return _response("200 OK", b"ok\n")
            return _response("503 Service Unavailable", b"unable to process messages\n")
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
