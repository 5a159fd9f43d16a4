"""Token deltas on core NATS, for ``troupe send --stream``: best effort, never in the way.

Each answer's deltas go to ``naming.token_stream_subject(ns, event.run_id, event.id)`` on
core NATS, never JetStream, so they bloat no stream. The messages are JSON:
``{"delta": "...", "turn": n}`` for text, ``{"tool": name, "turn": n}`` when a tool is
called, ``{"done": true, "turn": n, "final": bool}`` at the end of each turn (``final`` on the
answer). A core publish only buffers (the server drops a slow subscriber, it never slows the
publisher), and a failed publish is logged, never raised: streaming cannot fail the loop.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from nats.aio.client import Client

from troupe_runtime.contract import naming
from troupe_runtime.contract.envelope import CloudEvent

logger = logging.getLogger(__name__)

MAX_DELTA_MESSAGES = 4096
"""Delta messages per turn; a model that streams more (one character at a time for
megabytes) has the rest sent whole, as one delta, when its turn is done."""


class TokenStream:
    """Publishes one answer's deltas; does nothing when streaming is off."""

    def __init__(self, nc: Client | None, subject: str) -> None:
        self._nc = nc
        self.subject = subject
        self._failed = False
        self._sent: dict[int, int] = {}
        self._held: dict[int, list[str]] = {}

    @classmethod
    def of(cls, nc: Client | None, namespace: str, event: CloudEvent, enabled: bool) -> TokenStream:
        subject = naming.token_stream_subject(namespace, event.run_id, event.id)
        return cls(nc if enabled else None, subject)

    @property
    def enabled(self) -> bool:
        return self._nc is not None

    async def _send(self, payload: dict[str, Any]) -> None:
        if self._nc is None:
            return
        try:
            await self._nc.publish(self.subject, json.dumps(payload).encode())
        except Exception as error:
            if not self._failed:  # once per answer is enough to explain a silent stream
                logger.warning("token stream %s: %s", self.subject, error)
            self._failed = True

    async def delta(self, text: str, turn: int) -> None:
        if not text or self._nc is None:
            return
        sent = self._sent.get(turn, 0)
        if sent >= MAX_DELTA_MESSAGES:
            self._held.setdefault(turn, []).append(text)
            return
        self._sent[turn] = sent + 1
        await self._send({"delta": text, "turn": turn})

    async def tool(self, name: str, turn: int) -> None:
        await self._send({"tool": name, "turn": turn})

    async def done(self, turn: int, final: bool) -> None:
        if held := self._held.pop(turn, None):
            await self._send({"delta": "".join(held), "turn": turn})
        await self._send({"done": True, "turn": turn, "final": final})
