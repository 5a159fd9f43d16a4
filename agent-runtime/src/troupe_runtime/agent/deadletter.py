"""Dead letters: where a message that cannot be processed goes, and why.

A dead letter keeps the original payload and CloudEvent headers, so it can be
replayed as it was, plus headers naming the reason, the error, the attempts,
the agent and where the message came from. Its ``Nats-Msg-Id`` is derived
from the original stream sequence: a message dead-lettered twice (by a
replica and by the MAX_DELIVERIES advisory, say) is stored once.
"""

from __future__ import annotations

import asyncio
import json
import logging

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.dead_letters import DeadLetterReason, Origin, dead_letter_headers
from troupe_runtime.nats.pull import Puller

logger = logging.getLogger(__name__)

RESCUE_BATCH = 16
RESCUE_WAIT_SECONDS = 1.0


class DeadLetters:
    """Publishes dead letters, and rescues messages JetStream gave up delivering."""

    def __init__(self, nc: Client, js: JetStreamContext, config: RuntimeConfig) -> None:
        self._js = js
        self._config = config
        self._agent = f"{config.namespace}/{config.agent}"
        self._rescuing: asyncio.Task[None] | None = None
        self._puller = Puller(
            nc, naming.advisory_stream(config.namespace, config.agent), naming.RESCUER_CONSUMER
        )

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
        await self._js.publish(
            self._config.dead_letter_subject,
            payload,
            headers=dead_letter_headers(
                headers,
                reason=reason,
                error=error,
                attempts=attempts,
                agent=self._agent,
                origin=origin,
            ),
        )

    async def watch_max_deliveries(self) -> None:
        """Catch messages the server stopped redelivering, e.g. one that crashes every replica.

        The advisories wait in a stream of their own until one replica takes
        each; the dead letter's message id makes a second rescue harmless.
        """
        await self._puller.start()
        self._rescuing = asyncio.create_task(self._rescue_loop())

    async def stop(self) -> None:
        if self._rescuing is not None:
            self._rescuing.cancel()
            await asyncio.gather(self._rescuing, return_exceptions=True)
            self._rescuing = None
        await self._puller.stop()

    async def _rescue_loop(self) -> None:
        while True:
            try:
                advisories = await self._puller.pull(RESCUE_BATCH, RESCUE_WAIT_SECONDS)
            except Exception:
                logger.exception("could not fetch MAX_DELIVERIES advisories; trying again")
                await asyncio.sleep(RESCUE_WAIT_SECONDS)
                continue
            for advisory in advisories:
                await self._on_advisory(advisory)

    async def _on_advisory(self, advisory: Msg) -> None:
        try:
            body = json.loads(advisory.data)
            await self.rescue(int(body["stream_seq"]), int(body["deliveries"]))
        except Exception:
            logger.exception("could not dead-letter after a MAX_DELIVERIES advisory")
            await advisory.nak(delay=RESCUE_WAIT_SECONDS)
            return
        await advisory.ack()

    async def rescue(self, sequence: int, deliveries: int) -> None:
        stream = self._config.inbox_stream
        try:
            stored = await self._js.get_msg(stream, sequence)
        except NotFoundError:
            return
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
        await self._js.delete_msg(stream, sequence)
        logger.warning(
            "dead-lettered message %s after %s deliveries without an acknowledgement",
            sequence,
            deliveries,
        )
