"""Append-only event logs, one per correlation id, on the namespace's event-log stream.

Appends carry a ``Nats-Msg-Id`` so that a redelivered handler re-appending the
same event is deduplicated by JetStream within the stream's duplicate window.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, Header
from nats.js.errors import NotFoundError

from troupe_runtime.contract import naming
from troupe_runtime.contract import state_codec as codec

EVENT_TYPE_HEADER = "Troupe-Event-Type"


@dataclass(frozen=True)
class Event:
    """One logged event: ``seq`` orders events across the namespace's logs."""

    seq: int
    type: str
    data: Any
    id: str
    time: datetime


class EventLog:
    """The event log of one correlation id (a run, a conversation, an order)."""

    def __init__(self, js: JetStreamContext, namespace: str, correlation_id: str) -> None:
        if not correlation_id or any(c in correlation_id for c in " \t\r\n*>"):
            raise ValueError(
                f"correlation id {correlation_id!r} cannot name an event log: "
                f"it must be non-empty, without whitespace, '*' or '>'"
            )
        self.correlation_id = correlation_id
        self.stream = naming.event_log_stream(namespace)
        self.subject = naming.event_log_subject(namespace, correlation_id)
        self._js = js

    async def append(self, event_type: str, data: Any, event_id: str | None = None) -> int:
        """Append and return the event's sequence; an ``event_id`` seen before is not re-added."""
        event_id = event_id or uuid.uuid4().hex
        ack = await self._js.publish(
            self.subject,
            codec.encode(data),
            stream=self.stream,
            headers={
                # Deduplication is per stream, which all correlation ids share.
                Header.MSG_ID: f"{self.correlation_id}:{event_id}",
                EVENT_TYPE_HEADER: event_type,
            },
        )
        return ack.seq

    async def replay(self) -> list[Event]:
        """Every event appended so far, oldest first."""
        try:
            last = await self._js.get_last_msg(self.stream, self.subject)
        except NotFoundError:
            return []
        assert last.seq is not None
        events = []
        async with self.follow() as follow:
            async for event in follow:
                events.append(event)
                if event.seq >= last.seq:
                    break
        return events

    def follow(self) -> Follow:
        """Every event from the first, then new ones as they are appended."""
        return Follow(self._js, self)


class Follow:
    """An ordered consumer over one event log; ``async with`` removes it when done."""

    def __init__(self, js: JetStreamContext, log: EventLog) -> None:
        self._js = js
        self._log = log
        self._sub: Subscription | None = None

    async def __aenter__(self) -> Follow:
        self._sub = await self._js.subscribe(
            self._log.subject,
            stream=self._log.stream,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    def __aiter__(self) -> Follow:
        return self

    async def __anext__(self) -> Event:
        if self._sub is None:
            await self.__aenter__()
        assert self._sub is not None
        msg = await self._sub.next_msg(timeout=None)
        headers = msg.headers or {}
        meta = msg.metadata
        return Event(
            seq=meta.sequence.stream,
            type=headers.get(EVENT_TYPE_HEADER, ""),
            data=codec.decode(msg.data, f"{self._log.subject}#{meta.sequence.stream}"),
            id=headers.get(Header.MSG_ID, "").removeprefix(f"{self._log.correlation_id}:"),
            time=meta.timestamp,
        )
