"""Dead letters: where a message that cannot be processed goes, and why.

A dead letter keeps the original payload and CloudEvent headers, so it can be
replayed as it was, plus headers naming the reason, the error, the attempts,
the agent and where the message came from. Its ``Nats-Msg-Id`` is derived
from the original stream sequence, so a message dead-lettered twice (by a
replica and by the MAX_DELIVERIES rescuer, say) is stored once; a forged
letter that took that id first is detected and the real one stored under an
unpredictable id (``troupe_runtime.contract.dead_letters`` says how).

The rescuer catches messages the server stopped redelivering (one that
crashes every replica). The server's MAX_DELIVERIES advisories wait in a
bounded stream of their own; each is only a hint, believed when the
consumer's state proves it (``troupe_runtime.contract.advisories``). Junk on
that subject is acked and logged, never retried. The rescue loop is
supervised: whatever ends it is logged, counted in ``troupe_rescuer_restarts``
and the loop started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from troupe_runtime.contract import advisories, naming
from troupe_runtime.contract.advisories import Advisory, ConsumerState, Junk, Verdict
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.dead_letters import (
    DeadLetterReason,
    Origin,
    dead_letter_headers,
    equivalent,
    fitted,
    letter_id,
)
from troupe_runtime.nats.pull import Puller
from troupe_runtime.serving.metrics import RuntimeMetrics

logger = logging.getLogger(__name__)

RESCUE_BATCH = 16
RESCUE_WAIT_SECONDS = 1.0
# A deferred advisory is looked at again after 1, 2, 4 … seconds, at most this.
MAX_RECHECK_SECONDS = 30.0
# Between "the consumer no longer holds it" and acting on it: long enough for the
# server to finish removing a message whose acknowledgement it has just processed.
CONFIRM_SECONDS = 0.2
MAX_RESTART_SECONDS = 30.0
NONCE_BYTES = 12
_LOGGED_SUBJECT = 200


class DeadLetters:
    """Publishes dead letters, and rescues messages JetStream gave up delivering."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        config: RuntimeConfig,
        metrics: RuntimeMetrics | None = None,
    ) -> None:
        self._nc = nc
        self._js = js
        self._config = config
        self._metrics = metrics or RuntimeMetrics()
        self._agent = f"{config.namespace}/{config.agent}"
        self._consumers = frozenset(
            config.consumer_name(priority) for priority in range(config.messaging.priority_levels)
        )
        self._rescuing: asyncio.Task[None] | None = None
        self._restart_delay = RESCUE_WAIT_SECONDS
        self._advisory_stream = naming.advisory_stream(config.namespace, config.agent)

    @property
    def enabled(self) -> bool:
        return self._config.dead_letter.enabled

    async def send(
        self,
        payload: bytes,
        headers: dict[str, str] | None,
        *,
        reason: DeadLetterReason,
        error: str,
        attempts: int,
        origin: Origin,
    ) -> None:
        """Store the message in the dead-letter stream; returns once JetStream has it."""
        letter, data = fitted(
            dead_letter_headers(
                headers,
                reason=reason,
                error=error,
                attempts=attempts,
                agent=self._agent,
                origin=origin,
            ),
            payload,
            self._nc.max_payload,
        )
        subject = self._config.dead_letter_subject
        ack = await self._js.publish(subject, data, headers=letter)
        if not ack.duplicate or await self._stored_is_ours(ack.seq, letter, data):
            return
        logger.warning(
            "dead letter id %s was taken by a letter that is not this message's (forged?); "
            "storing message %s of %s under an unpredictable id",
            letter_id(origin),
            origin.sequence,
            origin.stream,
        )
        nonce = secrets.token_hex(NONCE_BYTES)
        await self._js.publish(
            subject, data, headers={**letter, "Nats-Msg-Id": letter_id(origin, nonce)}
        )

    async def _stored_is_ours(self, sequence: int, letter: dict[str, str], data: bytes) -> bool:
        try:
            stored = await self._js.get_msg(self._config.dead_letter_stream, sequence)
        except NotFoundError:
            return False  # deleted meanwhile: store ours rather than risk losing it
        return equivalent(letter, data, stored.headers, stored.data or b"")

    # The rescuer

    async def watch_max_deliveries(self) -> None:
        """Catch messages the server stopped redelivering, e.g. one that crashes every replica."""
        self._rescuing = asyncio.create_task(self._supervise())

    async def stop(self) -> None:
        if self._rescuing is not None:
            self._rescuing.cancel()
            await asyncio.gather(self._rescuing, return_exceptions=True)
            self._rescuing = None

    async def _supervise(self) -> None:
        """Run the rescue loop; whatever ends it is logged and counted, and it starts again."""
        while True:
            try:
                await self._rescue_loop()
                logger.error("the MAX_DELIVERIES rescuer stopped by itself; restarting it")
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception(
                    "the MAX_DELIVERIES rescuer failed; restarting it in %gs", self._restart_delay
                )
            self._metrics.rescuer_restarts.inc()
            await asyncio.sleep(self._restart_delay)
            self._restart_delay = min(self._restart_delay * 2, MAX_RESTART_SECONDS)

    async def _rescue_loop(self) -> None:
        puller = Puller(self._nc, self._advisory_stream, naming.RESCUER_CONSUMER)
        await puller.start()
        try:
            while True:
                try:
                    batch = await puller.pull(RESCUE_BATCH, RESCUE_WAIT_SECONDS)
                except Exception:
                    logger.exception("could not fetch MAX_DELIVERIES advisories; trying again")
                    await asyncio.sleep(RESCUE_WAIT_SECONDS)
                    continue
                self._restart_delay = RESCUE_WAIT_SECONDS
                for msg in batch:
                    await self._on_advisory(msg)
        finally:
            await asyncio.shield(_quietly(puller.stop()))

    async def _on_advisory(self, msg: Msg) -> None:
        try:
            advisory = advisories.parse(
                msg.subject, msg.data, self._config.inbox_stream, self._consumers
            )
        except Junk as junk:
            logger.warning(
                "dropped a message on the advisory subject %r: %s",
                msg.subject[:_LOGGED_SUBJECT],
                junk,
            )
            self._metrics.advisories.labels("junk").inc()
            await msg.ack()
            return
        try:
            verdict, why = await self._rescue(advisory)
        except Exception:
            logger.exception("could not act on a MAX_DELIVERIES advisory; trying again")
            await msg.nak(delay=_recheck_delay(msg))
            return
        self._metrics.advisories.labels(verdict.value).inc()
        if verdict is Verdict.DEFER:
            logger.info("MAX_DELIVERIES advisory deferred: %s", why)
            await msg.nak(delay=_recheck_delay(msg))
            return
        if verdict is Verdict.DROP:
            logger.warning("MAX_DELIVERIES advisory dropped: %s", why)
        await msg.ack()

    async def _rescue(self, advisory: Advisory) -> tuple[Verdict, str]:
        """Dead-letter the message if the consumer's state proves the server gave up on it."""
        stream = self._config.inbox_stream
        try:
            info = await self._js.consumer_info(stream, advisory.consumer)
        except NotFoundError:
            return Verdict.DROP, f"consumer {advisory.consumer} of {stream} does not exist"
        # The consumer's state first: a message it no longer holds never comes back to it.
        state = ConsumerState(
            filter_subject=info.config.filter_subject,
            filter_subjects=tuple(info.config.filter_subjects or ()),
            max_deliver=info.config.max_deliver or 0,
            delivered_stream_seq=info.delivered.stream_seq or 0,
            ack_floor_stream_seq=info.ack_floor.stream_seq or 0,
            ack_pending=info.num_ack_pending or 0,
        )
        stored = await self._stored(advisory.sequence)
        verdict, why = advisories.judge(advisory, state, None if stored is None else stored.subject)
        if verdict is not Verdict.RESCUE:
            return verdict, why
        await asyncio.sleep(CONFIRM_SECONDS)
        stored = await self._stored(advisory.sequence)
        if stored is None:
            return Verdict.DROP, f"message {advisory.sequence} was handled meanwhile"
        await self._dead_letter(stored, advisory)
        return verdict, why

    async def _stored(self, sequence: int) -> RawStreamMsg | None:
        try:
            return await self._js.get_msg(self._config.inbox_stream, sequence)
        except NotFoundError:
            return None

    async def _dead_letter(self, stored: RawStreamMsg, advisory: Advisory) -> None:
        stream, sequence, deliveries = (
            self._config.inbox_stream,
            advisory.sequence,
            advisory.deliveries,
        )
        if self.enabled:
            await self.send(
                stored.data or b"",
                stored.headers,
                reason=DeadLetterReason.MAX_DELIVERIES,
                error=f"delivered {deliveries} times without an acknowledgement; "
                "the handler may crash or hang the process",
                attempts=deliveries,
                origin=Origin(subject=stored.subject or "", stream=stream, sequence=sequence),
            )
            self._metrics.dead_lettered.labels(DeadLetterReason.MAX_DELIVERIES.value).inc()
        # NotFound: another replica's rescuer got there first; the letter was deduplicated.
        with contextlib.suppress(NotFoundError):
            await self._js.delete_msg(stream, sequence)
        logger.warning(
            "dead-lettered message %s after %s deliveries without an acknowledgement",
            sequence,
            deliveries,
        )


def _recheck_delay(msg: Msg) -> float:
    """1, 2, 4 … seconds by how often the advisory was delivered, at most MAX_RECHECK."""
    tries = min(max(msg.metadata.num_delivered - 1, 0), 10)
    return min(float(2**tries), MAX_RECHECK_SECONDS)


async def _quietly(stopping: Awaitable[None]) -> None:
    try:
        await stopping
    except Exception:
        logger.debug("could not unsubscribe the rescuer's puller", exc_info=True)
