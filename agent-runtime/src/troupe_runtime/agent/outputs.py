"""What one input causes: its outputs and its reply, each with a deterministic id.

Every follow-up event is derived from the input (``CloudEvent.follow_up``) by
its index, and published with a ``Nats-Msg-Id`` derived from its id, so a
redelivered input publishes the same events again and JetStream drops the
duplicates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import Header

from troupe_runtime.agent.schemas import ContractChecker
from troupe_runtime.contract import envelope
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.envelope import OUTPUT_TYPE_SUFFIX, CloudEvent
from troupe_runtime.serving import tracing

# Follow-up index of the one reply an event with ``replyto`` gets; outputs count from 0.
REPLY_INDEX = -1


def output_msg_id(event_id: str, subject: str) -> str:
    """An output goes to several subjects; each copy is deduplicated on its own."""
    return f"{event_id}:{subject}"


def reply_msg_id(event_id: str, subject: str) -> str:
    """A reply goes to one subject, ``replyto``."""
    return event_id


async def publish_follow_up(
    js: JetStreamContext,
    config: RuntimeConfig,
    cause: CloudEvent,
    *,
    type: str,
    data: Any,
    index: int,
    subjects: Sequence[str],
    msg_id: Callable[[str, str], str],
) -> None:
    """Publish the ``index``-th event ``cause`` causes to ``subjects``; returns once stored."""
    scope = f"{config.namespace}/{config.agent}"
    event = cause.follow_up(
        source=f"/{scope}",
        type=type,
        data=data,
        index=index,
        scope=scope,
        traceparent=tracing.outgoing(cause.traceparent),
    )
    headers, payload = envelope.to_binary(event)
    await asyncio.gather(
        *(
            js.publish(
                subject,
                payload,
                headers={**headers, Header.MSG_ID.value: msg_id(event.id, subject)},
            )
            for subject in subjects
        )
    )


class Outputs:
    """Publishes one input's outputs, numbering them so their ids are deterministic."""

    def __init__(
        self,
        js: JetStreamContext,
        config: RuntimeConfig,
        checker: ContractChecker,
        cause: CloudEvent,
    ) -> None:
        self._js = js
        self._config = config
        self._checker = checker
        self._cause = cause
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    async def publish(self, data: Any, type: str | None, subject: str | None) -> None:
        """Check ``data`` against the contract, then publish it to ``subject`` or to all."""
        subjects = self._config.contract.output_subjects
        if subject is not None and subject not in subjects:
            raise ValueError(
                f"subject {subject!r} is not in contract.outputSubjects {subjects}; declare it"
            )
        self._checker.check_output(data)
        index = self._count
        self._count += 1
        await publish_follow_up(
            self._js,
            self._config,
            self._cause,
            type=type or f"{self._cause.type}.{OUTPUT_TYPE_SUFFIX}",
            data=data,
            index=index,
            subjects=[subject] if subject is not None else subjects,
            msg_id=output_msg_id,
        )


async def send_reply(
    js: JetStreamContext, config: RuntimeConfig, cause: CloudEvent, type: str, data: Any
) -> None:
    """Tell whoever set ``replyto`` (a workflow engine) how ``cause`` ended.

    The reply's id is deterministic, so a redelivered input replies once."""
    if cause.replyto is None:
        return
    await publish_follow_up(
        js,
        config,
        cause,
        type=type,
        data=data,
        index=REPLY_INDEX,
        subjects=[cause.replyto],
        msg_id=reply_msg_id,
    )
