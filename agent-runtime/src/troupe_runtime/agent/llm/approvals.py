"""Tool-call approvals of an LLM agent: park a call, take its decision, notice its timeout.

The round trip (``contract.approvals``), the Agent's side:

1. **Park.** Before a call its rule guards runs (``loop.py``), the ``Gate`` journals the
   message as ``parked`` (the call, the Approval's name, the CloudEvent as it arrived),
   *then* files the ``ApprovalRequest`` (Pending) in the namespace's approvals bucket, and
   raises ``ParkMessage``: the runtime acknowledges the message with no reply. Journal
   first, so a decision (which needs the request) always finds the message to resume;
   filing is a create, so a redelivered message files nothing twice.
2. **Decide.** The operator relays a person's decision to the Agent's
   ``naming.agent_approvals_subject``, which its inbox stream stores and its priority-0
   consumer reads. ``ApprovalDesk.take`` validates it hard: a malformed event, an unknown
   Approval, one that is not this Agent's, a request no longer Pending, or a parked call
   the journal does not hold: logged and acknowledged, nothing else. Otherwise it writes
   the request's final phase compare-and-set (the bucket's revision is the one arbiter, so
   of a person's decision and the timeout the first to land is the decision, and a decision
   relayed twice is taken once), journals the decision (who, when, why), and hands back the
   parked message, which the processor runs again as a resumed message: the loop replays
   its journal and acts on the decision. A delivery of the same decision that finds the
   request already final *with that decision* resumes as well (an earlier attempt wrote the
   phase and then failed), and only on a redelivery (``num_delivered`` > 1).
   A gateway caller is told at once: an ``approvals.REQUEST_TYPE`` event on its reply
   subject (the Approval, the tool, the message), shown as A2A's ``input-required``.
3. **Time out.** Every replica of an Agent with a guarding rule looks through the bucket
   every ``scan_seconds`` for this Agent's Pending requests past ``expiresAt`` and
   publishes a timeout decision for each
   (``decidedBy`` ``troupe:timeout``, ``Nats-Msg-Id`` per Approval, so replicas publish it
   once within the duplicate window), which ``take`` resolves by the request's own
   ``onTimeout``: a timeout is believed only once the request has expired, so a forged one
   changes nothing earlier.

Who may publish on the approvals subject is NATS's to say (the decision carries no
signature): the runtime trusts the subject, as it trusts its inbox, and checks everything
the decision claims against the request it filed itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
)
from nats.js.kv import KeyValue
from pydantic import ValidationError

from troupe_runtime.agent.llm.journal import Decision, Journal, Parked, call_key
from troupe_runtime.agent.llm.types import ParkMessage, ToolCall, ToolResult
from troupe_runtime.agent.outputs import publish_follow_up
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.approvals import (
    DECISION_TYPE,
    MAX_REASON_CHARS,
    REQUEST_TYPE,
    TIMEOUT_DECIDER,
    ApprovalDecision,
    ApprovalRequest,
    Requester,
    approval_name,
    approvals_bucket_config,
    bounded_text,
)
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.tool_approvals import ToolApprovals, request_message

logger = logging.getLogger(__name__)

SCAN_SECONDS = 15.0
"""How often a replica looks for requests whose timeout passed."""
TIMEOUT_REASON = "no decision within the approval's timeout"
RESERVED_DECIDER_PREFIX = "troupe:"
"""``decidedBy`` values only Troupe itself writes (a timeout, a withdrawal)."""
MAX_DECIDER_CHARS = 256
CAS_ATTEMPTS = 5
UNPARKABLE = (
    "error: the call of {name!r} needs a person's approval, but this message is too large to "
    "wait for one, so the call did not run."
)
WAITING_INDEX = -2
"""The follow-up index of the event telling a gateway caller the message waits (the reply's
is -1, outputs count from 0)."""


def _now() -> datetime:
    return datetime.now(UTC)


def resolve(
    request: ApprovalRequest, decision: ApprovalDecision, now: datetime
) -> ApprovalRequest | str:
    """The request's final form under ``decision``, or why the decision changes nothing
    (pure)."""
    if decision.name != request.name:
        return f"the decision names Approval {decision.name}, not {request.name}"
    if not request.pending:
        return f"the request is {request.phase} already"
    if decision.decided_by == TIMEOUT_DECIDER:
        if request.expires_at is None or request.expires_at > now:
            return "a timeout for a request that has not expired"
        approved = request.on_timeout == "approve"
        return request.model_copy(
            update={
                "phase": "TimedOut",
                "approved": approved,
                "decided_by": TIMEOUT_DECIDER,
                "decided_at": request.expires_at,
                "reason": TIMEOUT_REASON,
            }
        )
    if decision.decided_by.startswith(RESERVED_DECIDER_PREFIX):
        return f"decidedBy {decision.decided_by!r} is reserved to Troupe"
    approved = decision.verdict == "Approve"
    return request.model_copy(
        update={
            "phase": "Approved" if approved else "Denied",
            "approved": approved,
            "decided_by": bounded_text(decision.decided_by, MAX_DECIDER_CHARS),
            "decided_at": decision.decided_at,
            "reason": bounded_text(decision.reason, MAX_REASON_CHARS),
        }
    )


def records(request: ApprovalRequest, decision: ApprovalDecision) -> bool:
    """Whether the final ``request`` is what ``decision`` made of it (pure)."""
    if request.pending:
        return False
    if decision.decided_by == TIMEOUT_DECIDER:
        return request.phase == "TimedOut"
    return (
        request.phase in ("Approved", "Denied")
        and request.decided_by == bounded_text(decision.decided_by, MAX_DECIDER_CHARS)
        and request.decided_at == decision.decided_at
        and request.approved == (decision.verdict == "Approve")
    )


def foreign(request: ApprovalRequest, key: str, namespace: str, agent: str) -> str | None:
    """Why a stored request is not one this Agent filed under ``key``, or None (pure)."""
    requester = request.requester
    if request.name != key or request.namespace != namespace:
        return f"the request under {key} names {request.namespace}/{request.name}"
    if requester.kind != "Agent" or requester.name != agent or requester.tool is None:
        return f"the request is {requester.kind} {requester.name}'s, not this Agent's"
    return None


def journaled(request: ApprovalRequest) -> Decision:
    """The decision as the journal keeps it, from the request's final form."""
    return Decision(
        approval=request.name,
        approved=bool(request.approved),
        phase=request.phase,
        decided_by=request.decided_by or "",
        decided_at=request.decided_at.isoformat() if request.decided_at else "",
        reason=request.reason or "",
    )


def timeout_event(request: ApprovalRequest, agent: str) -> CloudEvent:
    """The timeout decision a replica publishes for an expired ``request``."""
    assert request.expires_at is not None
    decision = ApprovalDecision(
        name=request.name,
        verdict="Approve" if request.on_timeout == "approve" else "Deny",
        decided_by=TIMEOUT_DECIDER,
        decided_at=request.expires_at,
        reason=TIMEOUT_REASON,
    )
    return CloudEvent(
        id=f"approval-timeout:{request.name}",
        source=f"/troupe-runtime/{agent}/approvals",
        type=DECISION_TYPE,
        time=request.expires_at,
        subject=request.name,
        datacontenttype=envelope.JSON_CONTENT_TYPE,
        data=decision.model_dump(mode="json", by_alias=True),
    )


class ApprovalDesk:
    """One Agent's approvals: files requests, takes decisions, times requests out."""

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        scan_seconds: float = SCAN_SECONDS,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        assert config.llm is not None
        self._config = config
        self.namespace = config.namespace
        self.agent = config.agent
        self.rules: ToolApprovals = config.llm.policy.approvals
        self.subject = naming.agent_approvals_subject(config.namespace, config.agent)
        self._scan_seconds = scan_seconds
        self._clock = clock
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._scanning: asyncio.Task[None] | None = None

    def use(self, js: JetStreamContext) -> None:
        """Work through ``js`` from now on, and look for timeouts."""
        self._js, self._kv = js, None
        if not self.rules.guarding:
            return  # nothing ever parks: no bucket to look through every scan_seconds
        if self._scanning is None or self._scanning.done():
            self._scanning = asyncio.create_task(self._scan_forever())

    async def stop(self) -> None:
        scanning, self._scanning = self._scanning, None
        if scanning is not None:
            scanning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scanning
        self._js, self._kv = None, None

    def now(self) -> datetime:
        return self._clock()

    def gate(self, event: CloudEvent, journal: Journal) -> Gate:
        return Gate(self, event, journal)

    def _session(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("the approvals are not bound to a NATS session")
        return self._js

    async def _bucket(self, *, create: bool) -> KeyValue | None:
        """The namespace's approvals bucket; created (as the operator would) when filing."""
        if self._kv is not None:
            return self._kv
        js = self._session()
        try:
            self._kv = await js.key_value(naming.approvals_bucket(self.namespace))
        except BucketNotFoundError:
            if not create:
                return None
            logger.info("creating the approvals bucket of namespace %s", self.namespace)
            self._kv = await js.create_key_value(approvals_bucket_config(self.namespace))
        return self._kv

    async def file(self, request: ApprovalRequest) -> None:
        """Put ``request`` in the bucket unless it is there already (a redelivery)."""
        kv = await self._bucket(create=True)
        assert kv is not None
        value = request.model_dump_json(by_alias=True).encode()
        with contextlib.suppress(KeyWrongLastSequenceError):
            await kv.create(naming.approval_key(request.name), value)

    async def announce(self, event: CloudEvent, request: ApprovalRequest) -> None:
        """Tell a gateway caller waiting on ``event`` that it waits for ``request``: an
        ``approvals.REQUEST_TYPE`` event on its reply subject, which the gateway shows as
        A2A's ``input-required`` until the answer follows there. Only to a gateway's reply
        subject: a Workflow engine or a calling agent would take it for the answer. Best
        effort: the park holds whether or not it is told."""
        replyto = event.replyto
        if replyto is None or not naming.is_gateway_reply_subject(self.namespace, replyto):
            return
        data = {
            "approval": request.name,
            "tool": request.requester.tool,
            "message": request.message,
            "expiresAt": request.expires_at.isoformat() if request.expires_at else None,
        }
        try:
            await publish_follow_up(
                self._session(),
                self._config,
                event,
                type=REQUEST_TYPE,
                data=data,
                index=WAITING_INDEX,
                subjects=[replyto],
                msg_id=lambda event_id, subject: f"{event_id}:{request.name}",
            )
        except Exception as error:  # NATS trouble, or a refused subject: the park holds
            logger.warning("the caller was not told Approval %s waits: %s", request.name, error)

    async def take(self, msg: Msg) -> CloudEvent | None:
        """The parked message ``msg``'s decision resumes, or None when it changes nothing
        (logged; the caller acknowledges ``msg``). NATS trouble raises: the decision is
        handed back and taken again."""
        try:
            event = envelope.parse(msg.headers, msg.data)
        except envelope.MalformedMessage as error:
            return _ignored("a malformed decision", error.reason)
        if event.type != DECISION_TYPE:
            return _ignored("not a decision", f"type {event.type!r}")
        try:
            decision = ApprovalDecision.model_validate(event.data)
        except ValidationError as error:
            return _ignored("an invalid decision", str(error.errors()[:3]))
        kv = await self._bucket(create=False)
        if kv is None:
            return _ignored(f"a decision on {decision.name}", "no approvals bucket")
        for _ in range(CAS_ATTEMPTS):
            key = naming.approval_key(decision.name)
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                return _ignored(f"a decision on {decision.name}", "no such request")
            try:
                request = ApprovalRequest.model_validate_json(entry.value or b"")
            except ValidationError:
                return _ignored(f"a decision on {decision.name}", "the request is not valid")
            if (problem := foreign(request, key, self.namespace, self.agent)) is not None:
                return _ignored(f"a decision on {decision.name}", problem)
            journal = Journal(self._session(), self.namespace, self.agent, request.requester.run_id)
            parked = (await journal.replay()).parked_as(request.name)
            if parked is None:
                return _ignored(f"a decision on {decision.name}", "no parked call waits for it")
            final = resolve(request, decision, self._clock())
            if isinstance(final, str):
                redelivered = msg.metadata.num_delivered > 1
                if not (redelivered and records(request, decision)):
                    return _ignored(f"a decision on {decision.name}", final)
                final = request  # taken before, and not finished: resume again
            else:
                value = final.model_dump_json(by_alias=True).encode()
                try:
                    await kv.update(key, value, last=entry.revision)
                except KeyWrongLastSequenceError:
                    continue  # written meanwhile (the timeout, or a replica): look again
            await journal.decided(parked.turn, parked.call_id, journaled(final))
            logger.info(
                "Approval %s: %s by %s; resuming the call of %r",
                final.name,
                final.phase,
                final.decided_by,
                parked.tool,
            )
            return envelope.parse(parked.headers, parked.payload)
        raise RuntimeError(f"Approval {decision.name} kept changing while being decided")

    async def expire_due(self) -> int:
        """Publish a timeout decision for each of this Agent's expired Pending requests;
        how many."""
        kv = await self._bucket(create=False)
        if kv is None:
            return 0
        try:
            keys = await kv.keys()
        except NoKeysError:
            return 0
        now, published = self._clock(), 0
        for key in keys:
            try:
                entry = await kv.get(key)
                request = ApprovalRequest.model_validate_json(entry.value or b"")
            except (KeyNotFoundError, ValidationError):
                continue
            if foreign(request, key, self.namespace, self.agent) is not None:
                continue
            if not request.pending or request.expires_at is None or request.expires_at > now:
                continue
            event = timeout_event(request, self.agent)
            headers, payload = envelope.to_binary(event)
            headers[Header.MSG_ID.value] = event.id
            await self._session().publish(self.subject, payload, headers=headers)
            published += 1
        return published

    async def _scan_forever(self) -> None:
        while True:
            await asyncio.sleep(self._scan_seconds)
            try:
                if (count := await self.expire_due()) > 0:
                    logger.info("%d approval requests timed out", count)
            except Exception as error:  # NATS trouble: the next look tries again
                logger.warning("looking for approvals that timed out failed: %s", error)


class Gate:
    """Parks one message's guarded calls (``loop.ApprovalGate``)."""

    def __init__(self, desk: ApprovalDesk, event: CloudEvent, journal: Journal) -> None:
        self._desk = desk
        self._event = event
        self._journal = journal

    async def park(
        self, turn: int, key: str, call: ToolCall, arguments: dict[str, Any], *, journaled: bool
    ) -> ToolResult:
        desk, event = self._desk, self._event
        name = approval_name(desk.agent, event.id, call_key(turn, key))
        if not journaled:
            headers, payload = envelope.to_binary(event)
            try:
                await self._journal.parked(Parked(turn, key, name, call.name, headers, payload))
            except nats.errors.MaxPayloadError:
                # The message and its journal record do not fit a NATS message: it cannot
                # wait, so the call is refused rather than retried to the same end.
                return ToolResult(UNPARKABLE.format(name=call.name), True)
        rule = desk.rules.rule_for(call.name)
        now = desk.now()
        expires = now + rule.timeout
        if event.deadline is not None:
            expires = min(expires, event.deadline)
        request = ApprovalRequest(
            name=name,
            namespace=desk.namespace,
            requester=Requester(kind="Agent", name=desk.agent, run_id=event.id, tool=call.name),
            approvers=rule.approvers,
            message=request_message(rule, agent=desk.agent, tool=call.name, arguments=arguments),
            requested_at=now,
            expires_at=expires,
            on_timeout=rule.on_timeout,
            reply_subject=desk.subject,
        )
        await desk.file(request)
        await desk.announce(event, request)
        raise ParkMessage(name, call.name)


def _ignored(what: str, why: str) -> CloudEvent | None:
    """Nothing to resume: ``take``'s answer to a decision that changes nothing, logged."""
    logger.warning("ignored %s: %s", what, why)
    return None
