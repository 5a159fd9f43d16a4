"""The conversation journal: one message's model turns and tool calls, on the event log.

Every step the loop must not repeat is appended to the namespace event log under the
correlation id ``naming.conversation_log_id(agent, event.id)``, with a deterministic id:

- ``turn-<n>``: the model's answer to turn ``n`` (its assistant message, usage, provider,
  model) and the messages added to the history since the turn before (the system prompt and
  the user input on turn 0, a repair request later): each turn's *new* messages, never the
  whole history, so the log grows with the conversation, not with its square;
- ``tool-start-<n>-<callid>``: before a non-idempotent tool runs;
- ``tool-<n>-<callid>``: the tool's result, as the model sees it (offloaded when large);
- ``fallback-<n>-<k>``: the ``k``-th model passed over on turn ``n``, and why;
- ``deferred-<k>``: the message's ``k``-th deferral (a 429 outlasting the handler's time);
- ``parked-<n>-<callid>``: the call waits for a person (``approvals.py``): the Approval's
  name and the message itself (its CloudEvent, as it arrived), so the decision can resume
  the conversation after the message was acknowledged;
- ``decided-<n>-<callid>``: the decision on that call (who, when, why, approved or not),
  once the request's final phase is written: the audit trail, and what the resumed loop
  acts on.

A redelivered message replays its journal and ``resume`` (pure) folds the records into
where the loop stands. The first delivery reads nothing: there is nothing to read, and the
hot path stays one append per turn. Replaying first and then appending only what is missing
keeps the log right past JetStream's duplicate window too (a record seen twice, by id, counts
once).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.js import JetStreamContext

from troupe_runtime.agent.llm.types import Completion, Fallback, InvalidModelOutput, Message
from troupe_runtime.contract import naming
from troupe_runtime.contract.usage import Usage
from troupe_runtime.nats.event_log import Event, EventLog

TURN = "llm.turn"
TOOL_START = "llm.tool-start"
TOOL_RESULT = "llm.tool"
FALLBACK = "llm.fallback"
DEFERRED = "llm.deferred"
PARKED = "llm.approval-parked"
DECIDED = "llm.approval-decided"


def turn_id(turn: int) -> str:
    return f"turn-{turn}"


def tool_start_id(turn: int, call_id: str) -> str:
    return f"tool-start-{turn}-{call_id}"


def tool_result_id(turn: int, call_id: str) -> str:
    return f"tool-{turn}-{call_id}"


def fallback_id(turn: int, index: int) -> str:
    return f"fallback-{turn}-{index}"


def deferred_id(index: int) -> str:
    return f"deferred-{index}"


def parked_id(turn: int, call_id: str) -> str:
    return f"parked-{turn}-{call_id}"


def decided_id(turn: int, call_id: str) -> str:
    return f"decided-{turn}-{call_id}"


def call_key(turn: object, call_id: object) -> str:
    """A tool call's key in the message: models reuse call ids from turn to turn."""
    return f"{turn}-{call_id}"


@dataclass(frozen=True)
class Record:
    """One journal record as replayed: its deterministic id, its type and its data."""

    id: str
    type: str
    data: Any


@dataclass(frozen=True)
class Parked:
    """A call that waits for a decision, and the message to resume when it comes."""

    turn: int
    call_id: str
    approval: str
    """The Approval's name (``approvals.approval_name``)."""
    tool: str
    headers: dict[str, str]
    payload: bytes
    """The message's CloudEvent in binary mode, as ``envelope.to_binary`` wrote it."""


@dataclass(frozen=True)
class Decision:
    """The decision on a parked call, as the request's final phase says."""

    approval: str
    approved: bool
    phase: str
    decided_by: str
    decided_at: str
    reason: str


@dataclass
class ResumeState:
    """Where a conversation stands after the records replayed so far."""

    messages: list[Message] = field(default_factory=list)
    """The history: every turn's new messages and answer, every tool result, in order."""
    next_turn: int = 0
    completed: dict[str, Message] = field(default_factory=dict)
    """Tool messages by ``call_key``, for the calls that finished."""
    started: set[str] = field(default_factory=set)
    """``call_key``s of non-idempotent calls started but never finished: never run again."""
    usage: Usage = field(default_factory=Usage)
    deferrals: int = 0
    repairs: int = 0
    """Repair turns asked so far (an invalid final answer gets one)."""
    last_answer: Message | None = None
    """The assistant message of the last turn, whose tool calls may be unfinished."""
    last_model: str | None = None
    """The model that answered the last turn."""
    opening: int = 0
    """How many messages opened the conversation (system prompt, user input): never elided."""
    parked: dict[str, Parked] = field(default_factory=dict)
    """Calls that asked for a decision, by ``call_key``."""
    decisions: dict[str, Decision] = field(default_factory=dict)
    """Decisions on parked calls, by ``call_key``: the first one journaled counts."""

    def parked_as(self, approval: str) -> Parked | None:
        """The parked call that waits for ``approval``."""
        return next((p for p in self.parked.values() if p.approval == approval), None)

    @property
    def fresh(self) -> bool:
        return self.next_turn == 0


def _usage(data: Mapping[str, Any]) -> Usage:
    try:
        return Usage.model_validate(data.get("usage") or {})
    except ValueError:
        return Usage()


def resume(records: Iterable[Record]) -> ResumeState:
    """The state the loop resumes from, given the records in log order (pure).

    A record whose id was seen before is skipped (an append repeated past the duplicate
    window); a turn record out of sequence is skipped too, so a broken log cannot make the
    loop skip a turn.
    """
    state = ResumeState()
    seen: set[str] = set()
    for record in records:
        if record.id in seen or not isinstance(record.data, dict):
            continue
        seen.add(record.id)
        data = record.data
        if record.type == TURN and data.get("turn") == state.next_turn:
            new = [m for m in data.get("new", []) if isinstance(m, dict)]
            answer = data.get("answer")
            if not isinstance(answer, dict):
                continue
            if state.next_turn == 0:
                state.opening = len(new)
            state.messages.extend(new)
            state.messages.append(answer)
            state.last_answer = answer
            state.last_model = data.get("model") if isinstance(data.get("model"), str) else None
            state.next_turn += 1
            state.usage = state.usage + _usage(data)
            state.repairs += 1 if data.get("repair") else 0
        elif record.type == TOOL_START and isinstance(data.get("callId"), str):
            state.started.add(call_key(data.get("turn"), data["callId"]))
        elif record.type == TOOL_RESULT and isinstance(data.get("message"), dict):
            call_id = data.get("callId")
            key = call_key(data.get("turn"), call_id)
            if isinstance(call_id, str) and key not in state.completed:
                state.completed[key] = data["message"]
                state.started.discard(key)
                state.messages.append(data["message"])
        elif record.type == DEFERRED:
            state.deferrals += 1
        elif record.type == PARKED and (parked := _parked(data)) is not None:
            state.parked.setdefault(call_key(data.get("turn"), data["callId"]), parked)
        elif record.type == DECIDED and (decision := _decision(data)) is not None:
            state.decisions.setdefault(call_key(data.get("turn"), data["callId"]), decision)
    return state


def _parked(data: Mapping[str, Any]) -> Parked | None:
    fields = (data.get("callId"), data.get("approval"), data.get("tool"), data.get("payload"))
    headers = data.get("headers")
    if not all(isinstance(value, str) for value in fields) or not isinstance(headers, dict):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        return None
    try:
        payload = base64.b64decode(data["payload"], validate=True)
    except ValueError:
        return None
    turn = data.get("turn")
    if not isinstance(turn, int) or isinstance(turn, bool):
        return None
    return Parked(turn, data["callId"], data["approval"], data["tool"], dict(headers), payload)


def _decision(data: Mapping[str, Any]) -> Decision | None:
    texts = ("callId", "approval", "phase", "decidedBy", "decidedAt", "reason")
    if not all(isinstance(data.get(name), str) for name in texts):
        return None
    if not isinstance(data.get("approved"), bool):
        return None
    return Decision(
        data["approval"],
        data["approved"],
        data["phase"],
        data["decidedBy"],
        data["decidedAt"],
        data["reason"],
    )


def parked_record(turn: int, call_id: str, parked: Parked) -> dict[str, Any]:
    return {
        "turn": turn,
        "callId": call_id,
        "approval": parked.approval,
        "tool": parked.tool,
        "headers": parked.headers,
        "payload": base64.b64encode(parked.payload).decode(),
    }


def decided_record(turn: int, call_id: str, decision: Decision) -> dict[str, Any]:
    return {
        "turn": turn,
        "callId": call_id,
        "approval": decision.approval,
        "approved": decision.approved,
        "phase": decision.phase,
        "decidedBy": decision.decided_by,
        "decidedAt": decision.decided_at,
        "reason": decision.reason,
    }


def turn_record(
    turn: int, new: list[Message], completion: Completion, *, repair: bool
) -> dict[str, Any]:
    return {
        "turn": turn,
        "new": new,
        "answer": completion.message,
        "finishReason": completion.finish_reason,
        "usage": completion.usage.model_dump(by_alias=True),
        "provider": completion.provider,
        "model": completion.model,
        "repair": repair,
    }


class Journal:
    """Appends one conversation's records; replays them on a redelivery."""

    def __init__(self, js: JetStreamContext, namespace: str, agent: str, event_id: str) -> None:
        self.correlation_id = naming.conversation_log_id(agent, event_id)
        self._log = EventLog(js, namespace, self.correlation_id)

    async def replay(self) -> ResumeState:
        events: list[Event] = await self._log.replay()
        return resume(Record(event.id, event.type, event.data) for event in events)

    async def turn(
        self, turn: int, new: list[Message], completion: Completion, *, repair: bool
    ) -> None:
        try:
            await self._log.append(
                TURN, turn_record(turn, new, completion, repair=repair), turn_id(turn)
            )
        except nats.errors.MaxPayloadError as error:
            # A turn is journaled whole before anything acts on it; one the server cannot
            # store would be asked for, and paid for, again on every retry.
            raise InvalidModelOutput(
                f"the model's answer to turn {turn} cannot be journaled: {error}"
            ) from error

    async def fallbacks(self, turn: int, fallbacks: Iterable[Fallback]) -> None:
        for index, passed in enumerate(fallbacks):
            data = {
                "turn": turn,
                "provider": passed.provider,
                "model": passed.model,
                "reason": passed.reason,
                "error": passed.error,
            }
            await self._log.append(FALLBACK, data, fallback_id(turn, index))

    async def tool_started(self, turn: int, call_id: str, name: str) -> None:
        data = {"turn": turn, "callId": call_id, "name": name}
        await self._log.append(TOOL_START, data, tool_start_id(turn, call_id))

    async def tool_finished(
        self, turn: int, call_id: str, message: Message, offloaded: str | None
    ) -> None:
        data = {"turn": turn, "callId": call_id, "message": message, "object": offloaded}
        await self._log.append(TOOL_RESULT, data, tool_result_id(turn, call_id))

    async def deferred(self, index: int, delay: float, error: str) -> None:
        data = {"deferral": index, "delay": delay, "error": error}
        await self._log.append(DEFERRED, data, deferred_id(index))

    async def parked(self, parked: Parked) -> None:
        await self._log.append(
            PARKED,
            parked_record(parked.turn, parked.call_id, parked),
            parked_id(parked.turn, parked.call_id),
        )

    async def decided(self, turn: int, call_id: str, decision: Decision) -> None:
        await self._log.append(
            DECIDED, decided_record(turn, call_id, decision), decided_id(turn, call_id)
        )
