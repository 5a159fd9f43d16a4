"""Which engine owns a workflow's runs: a lease on the workflow's own stream, fenced.

The lease is the last message on ``…workflows.<name>.lease.owner``; its stream sequence is
the fencing token. Taking it is a compare-and-set on that subject
(``Nats-Expected-Last-Subject-Sequence``), so two contenders never both win, and every
append to a run's log carries the token (``…-Sequence-Subject`` names the lease
subject), so the server itself refuses the log writes of an engine that lost the lease,
however late they arrive. Time never decides who owns: the owner answers a probe
(core NATS) while it lives; a contender takes over when nobody answers, which is at
once when the owner's connection closes (it stopped or its process died), or after
``TAKEOVER_SECONDS`` of unanswered probes when it hangs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import APIError

from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.nats.kv import WRONG_LAST_SEQUENCE
from troupe_runtime.nats.streams import last_message

logger = logging.getLogger(__name__)
T = TypeVar("T")

EXPECTED_SUBJECT_HEADER = "Nats-Expected-Last-Subject-Sequence-Subject"
PROBE_TIMEOUT_SECONDS = 0.5
PROBE_INTERVAL_SECONDS = 0.1
TAKEOVER_SECONDS = 10.0
"""How long an owner may leave probes unanswered (a hung process) before it is replaced."""


def holder_id() -> str:
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def is_fenced(error: Exception) -> bool:
    """Whether a publish was refused because the lease moved on (the fence held)."""
    return isinstance(error, APIError) and error.err_code in WRONG_LAST_SEQUENCE


class LeaseLost(Exception):
    """This engine no longer owns the workflow's runs; another one does."""


class Lease:
    """This engine's claim on one workflow's runs."""

    def __init__(self, nc: Client, js: JetStreamContext, config: EngineConfig) -> None:
        self._nc = nc
        self._js = js
        self._stream = config.stream
        self._subject = config.lease_subject
        self._probe = config.probe_subject
        self.holder = holder_id()
        self.token: int | None = None
        self._answering: Subscription | None = None

    @property
    def held(self) -> bool:
        return self.token is not None

    def fence(self) -> dict[str, str]:
        """Headers that make a publish to the workflow's stream conditional on the lease."""
        if self.token is None:
            raise LeaseLost(f"engine {self.holder} does not own the runs of {self._stream}")
        return {
            Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(self.token),
            EXPECTED_SUBJECT_HEADER: self._subject,
        }

    async def acquire(self, stopped: Callable[[], bool]) -> bool:
        """Wait until this engine owns the runs (True), or ``stopped()`` (False)."""
        loop = asyncio.get_running_loop()
        unanswered_since: float | None = None
        while not stopped():
            owner = await self._probe_owner()
            now = loop.time()
            if owner is None:
                if await self._take():
                    return True
            elif owner == "":
                unanswered_since = unanswered_since or now
                if now - unanswered_since >= TAKEOVER_SECONDS and await self._take():
                    logger.warning("the owner of %s stopped answering; took over", self._stream)
                    return True
            else:
                unanswered_since = None
            await asyncio.sleep(PROBE_INTERVAL_SECONDS)
        return False

    async def _probe_owner(self) -> str | None:
        """The owner's holder id; None when nobody owns; "" when the owner does not answer."""
        try:
            reply = await self._nc.request(self._probe, b"", timeout=PROBE_TIMEOUT_SECONDS)
        except NoRespondersError:
            return None
        except NatsTimeoutError:
            return ""
        return _holder(reply.data) or ""

    async def _take(self) -> bool:
        """Compare-and-set the lease subject; then answer probes, as the owner."""
        current = await last_message(self._js, self._stream, self._subject)
        expected = current[0] if current else 0
        try:
            ack = await self._js.publish(
                self._subject,
                json.dumps({"holder": self.holder}).encode(),
                stream=self._stream,
                headers={Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(expected)},
            )
        except APIError as error:
            if is_fenced(error):
                return False  # another contender won
            raise
        self.token = ack.seq
        self._answering = await self._nc.subscribe(self._probe, cb=self._answer)
        logger.info("engine %s owns the runs of %s (token %d)", self.holder, self._stream, ack.seq)
        return True

    async def _answer(self, msg: Msg) -> None:
        if msg.reply and self.token is not None:
            await msg.respond(json.dumps({"holder": self.holder, "token": self.token}).encode())

    async def confirm(self) -> None:
        """Check the lease is still ours (raise ``LeaseLost`` if not); a lease of ours
        that was renewed, or that expired with the stream's max age, is taken up again."""
        if self.token is None:
            raise LeaseLost(f"engine {self.holder} does not own the runs of {self._stream}")
        current = await last_message(self._js, self._stream, self._subject)
        if current is not None and current[0] == self.token:
            return
        if current is not None and _holder(current[1]) == self.holder:
            self.token = current[0]
            return
        if current is None:
            # Our lease aged out of the stream: nobody else took it (they would have had
            # to win a compare-and-set against it), so take it back.
            try:
                ack = await self._js.publish(
                    self._subject,
                    json.dumps({"holder": self.holder}).encode(),
                    stream=self._stream,
                    headers={Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: "0"},
                )
            except APIError as error:
                if not is_fenced(error):
                    raise
            else:
                self.token = ack.seq
                return
        await self.release()
        raise LeaseLost(f"engine {self.holder} lost the runs of {self._stream} to another engine")

    async def renew(self) -> None:
        """Write the lease again (same holder) so it never ages out of the stream."""
        if self.token is None:
            return
        try:
            ack = await self._js.publish(
                self._subject,
                json.dumps({"holder": self.holder}).encode(),
                stream=self._stream,
                headers={Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(self.token)},
            )
        except APIError as error:
            if not is_fenced(error):
                raise
            await self.confirm()
            return
        self.token = ack.seq

    async def release(self) -> None:
        """Stop answering probes, so a contender takes over at once."""
        self.token = None
        if self._answering is not None:
            subscription, self._answering = self._answering, None
            try:
                await subscription.unsubscribe()
            except Exception:  # a closed connection has dropped it already
                logger.debug("unsubscribing the lease probe failed", exc_info=True)


def _holder(data: bytes) -> str | None:
    """The holder id a lease record or probe answer names; None for anything else, however
    hostile (a probe answer can come from any client on the subject)."""
    try:
        holder = json.loads(data).get("holder")
    except (ValueError, AttributeError, RecursionError):
        return None
    return holder if isinstance(holder, str) else None


async def fenced_retry(lease: Lease, publish: Callable[[], Awaitable[T]]) -> T:
    """``publish`` under the lease; once more if our own lease merely moved (renewed)."""
    try:
        return await publish()
    except APIError as error:
        if not is_fenced(error):
            raise
    await lease.confirm()  # raises LeaseLost if another engine owns the runs now
    return await publish()
