"""What one input causes: its outputs and its reply, each with a deterministic id.

Every follow-up event is derived from the input (``CloudEvent.follow_up``) by
its index, and published with a ``Nats-Msg-Id`` derived from its id, so a
redelivered input publishes the same events again and JetStream drops the
duplicates.

Targets are on an allow-list. Outputs go only to ``contract.outputSubjects``;
a reply goes only to a workflow engine's reply subject in the agent's own
namespace (``naming.workflow_replies_wildcard``) or to an LLM agent's tool
call (``naming.agent_call_reply_subject``, stored on the namespace's event
log), never to the server's own ``$`` subjects (the JetStream API, system
events) or another namespace: a message carrying any other ``replyto`` is
refused before its handler runs (``reply_refusal``). What cannot be stored,
an event too large for the server with its headers or a subject no stream
stores, raises ``Undeliverable``: the message is dead-lettered with that
reason at once, since another attempt would re-run the handler for the same
end.

Extension attributes a handler sets in ``ctx.attributes`` (an LLM agent's
token usage) go on every output and on the reply, the failure reply
included. So does the input's Workflow (``troupeworkflow``, when it is a
Workflow's name), as the correlation id does, so a Workflow's Budget counts
every call made anywhere in its runs; it wins over a handler's own.
Attributes come from handler code, so one that is not a valid CloudEvents
extension (``envelope.extension_problem``) is logged and dropped, never a
reason to fail the message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import Header

from troupe_runtime.agent.schemas import ContractChecker
from troupe_runtime.contract import envelope, naming, wire
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.envelope import OUTPUT_TYPE_SUFFIX, CloudEvent
from troupe_runtime.nats.publish import NoStream, max_payload, publish_stored
from troupe_runtime.serving import tracing

# Follow-up index of the one reply an event with ``replyto`` gets; outputs count from 0.
REPLY_INDEX = -1

logger = logging.getLogger(__name__)


def valid_extensions(
    attributes: Mapping[Any, Any], reported: set[str] | None = None
) -> dict[str, Any]:
    """The attributes that are valid CloudEvents extensions; the others are logged (once
    per name in ``reported``, when given) and dropped."""
    kept: dict[str, Any] = {}
    for name, value in attributes.items():
        problem = envelope.extension_problem(name, value)
        if problem is None:
            kept[name] = value
        elif reported is None or repr(name) not in reported:
            logger.warning("ctx.attributes: %s; the attribute is not published", problem)
            if reported is not None:
                reported.add(repr(name))
    return kept


class Undeliverable(Exception):
    """An output or reply that can never be stored; retrying would only re-run the handler."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def reply_refusal(config: RuntimeConfig, replyto: str | None) -> str | None:
    """Why the agent will not reply to ``replyto``, or None when it may (or need not)."""
    if replyto is None:
        return None
    allowed = naming.workflow_replies_wildcard(config.namespace)
    if naming.subject_matches(allowed, replyto):
        return None
    if naming.is_agent_call_reply_subject(config.namespace, replyto):
        return None  # an LLM agent calling this one as a tool
    if naming.is_gateway_reply_subject(config.namespace, replyto):
        return None  # a call through the gateway (or `troupe call`)
    calls = naming.event_log_subject(config.namespace, f"{naming.AGENT_CALL_LOG_PREFIX}...")
    return (
        f"replyto {replyto!r} is not a workflow reply subject of namespace "
        f"{config.namespace!r} ({allowed}) nor an agent call's or a gateway call's "
        f"({calls}, {naming.GATEWAY_REPLY_PREFIX}...); agent "
        f"{config.agent} replies only there"
    )


def output_refusal(config: RuntimeConfig, subject: str) -> str | None:
    """Why a handler may not publish to ``subject``, or None when it may."""
    subjects = config.contract.output_subjects
    if subject not in subjects:
        return f"subject {subject!r} is not in contract.outputSubjects {subjects}; declare it"
    if subject.startswith(naming.RESERVED_SUBJECT_PREFIX) or not naming.is_literal_subject(subject):
        return (
            f"contract.outputSubjects entry {subject!r} is a server subject or not a literal "
            "subject; outputs go to subjects a stream stores"
        )
    return None


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
    extensions: Mapping[str, Any] | None = None,
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
        extensions={**(extensions or {}), **envelope.workflow_extension(cause)},
    )
    headers, payload = envelope.to_binary(event)
    copies = {
        subject: {**headers, Header.MSG_ID.value: msg_id(event.id, subject)} for subject in subjects
    }
    limit = max_payload(js)
    for subject, subject_headers in copies.items():
        reason = wire.oversize_reason(f"the {type} event", subject, payload, subject_headers, limit)
        if reason is not None:
            raise Undeliverable(reason)
    try:
        await asyncio.gather(
            *(publish_stored(js, subject, payload, copy) for subject, copy in copies.items())
        )
    except NoStream as error:
        raise Undeliverable(str(error)) from error


class Outputs:
    """Publishes one input's outputs, numbering them so their ids are deterministic."""

    def __init__(
        self,
        js: JetStreamContext,
        config: RuntimeConfig,
        checker: ContractChecker,
        cause: CloudEvent,
        attributes: Callable[[], Mapping[Any, Any]] = dict,
    ) -> None:
        self._js = js
        self._config = config
        self._checker = checker
        self._cause = cause
        self._attributes = attributes
        self._reported: set[str] = set()
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def extensions(self) -> dict[str, Any]:
        """The handler's ``ctx.attributes`` as they are now, the invalid ones dropped."""
        try:
            attributes = self._attributes()
            return valid_extensions(attributes, self._reported)
        except Exception as error:  # handler code replaced the dict with anything at all
            if "" not in self._reported:
                self._reported.add("")
                logger.warning("ctx.attributes is unusable (%r); none are published", error)
            return {}

    async def publish(self, data: Any, type: str | None, subject: str | None) -> None:
        """Check ``data`` against the contract, then publish it to ``subject`` or to all."""
        subjects = self._config.contract.output_subjects
        for target in subjects if subject is None else [subject]:
            if (refusal := output_refusal(self._config, target)) is not None:
                raise Undeliverable(refusal)
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
            extensions=self.extensions(),
        )


async def send_reply(
    js: JetStreamContext,
    config: RuntimeConfig,
    cause: CloudEvent,
    type: str,
    data: Any,
    extensions: Mapping[str, Any] | None = None,
) -> None:
    """Tell whoever set ``replyto`` (a workflow engine) how ``cause`` ended.

    The reply's id is deterministic, so a redelivered input replies once. A
    ``replyto`` off the allow-list gets nothing (its message was refused).
    ``extensions`` must be valid already (``Outputs.extensions``)."""
    if cause.replyto is None or reply_refusal(config, cause.replyto) is not None:
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
        extensions=extensions,
    )
