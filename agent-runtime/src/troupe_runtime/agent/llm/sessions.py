"""An LLM agent's sessions in NATS: the history and the queue of each, compare-and-set.

The pure rules are the contract's (``contract.sessions``: ``fold`` caps a history,
``admit`` is the double-texting policy); this module reads and writes them in the Agent's
session bucket (the one module of the agent that touches it), retrying a lost compare-and-set on a
fresh read, so two replicas writing one session never lose a turn or a place.

The queue is the session's in-flight marker. A message enters it before its loop
(``enter``: refused under ``reject``, else waiting, polling every ``POLL_SECONDS`` and
reporting progress, until it is first), renews its slot when half its lease has passed
(``lease`` is the Agent's timeout plus its ackWait: a replica killed mid-run holds the
session no longer, and its redelivered message, same event id, finds its own place again),
asks at each turn boundary whether a newer message told it to stop (``stop``), renews its
slot on every progress report once half a lease has passed (``renew``: long tool calls
between two boundaries), and leaves in any case (``leave``). Values that are not what this
module writes (junk under a key) count as an empty history or queue, and are overwritten by
the next write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ValidationError

from troupe_runtime.agent.llm.types import Message
from troupe_runtime.contract import naming
from troupe_runtime.contract.sessions import (
    Exchange,
    SessionHistory,
    SessionPolicy,
    SessionQueue,
    Slot,
    StopMark,
    admit,
    fold,
    summarised,
)

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2
"""How often a waiting message reads its session's queue again."""
CAS_ATTEMPTS = 20
"""Compare-and-set rounds before a write gives up (the message is then retried)."""
SUMMARY_NOTE = "Summary of the earlier conversation: {summary}"
SUMMARY_PROMPT = (
    "Summarise the conversation below in a few sentences, keeping the facts, names, numbers "
    "and decisions a later answer may need. Write only the summary."
)

Model = TypeVar("Model", bound=BaseModel)
Summarizer = Callable[[str], Awaitable[str]]
"""Asks the agent's model for a summary of the text it is given."""


def history_messages(history: SessionHistory) -> list[Message]:
    """What the model is told of the session: the summary as a system note, then each
    exchange as the user's message and the assistant's answer."""
    messages: list[Message] = []
    if history.summary:
        messages.append({"role": "system", "content": SUMMARY_NOTE.format(summary=history.summary)})
    for turn in history.turns:
        messages.append({"role": "user", "content": turn.user})
        messages.append({"role": "assistant", "content": turn.assistant})
    return messages


def with_history(opening: list[Message], history: SessionHistory) -> list[Message]:
    """``opening`` (system prompt, user input) with the session's messages between them."""
    prior = history_messages(history)
    head = [m for m in opening[:1] if m.get("role") == "system"]
    return [*head, *prior, *opening[len(head) :]]


def summary_request(history: SessionHistory, dropped: tuple[Exchange, ...]) -> str:
    """The text a summary is asked of: the summary so far and the exchanges leaving."""
    parts = [f"Earlier summary: {history.summary}"] if history.summary else []
    for turn in dropped:
        parts.append(f"User: {turn.user}\nAssistant: {turn.assistant}")
    return "\n\n".join(parts)


class SessionContended(Exception):
    """Every compare-and-set round lost to other writers: the message is tried again."""


class SessionStore:
    """One Agent's sessions in its bucket."""

    def __init__(
        self,
        kv: KeyValue,
        policy: SessionPolicy,
        lease: float,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._kv = kv
        self.policy = policy
        self._lease = lease
        self._clock = clock
        self._sleep = sleep
        self._expiries: dict[str, float] = {}
        """When the slot of each message of this replica running a session expires."""

    async def _read(self, model: type[Model], key: str) -> tuple[Model, int]:
        """The value under ``key`` (empty when missing or junk) and its revision."""
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError as missing:
            tombstone: KeyValue.Entry | None = missing.entry  # set when the key was deleted
            return model(), (tombstone and tombstone.revision) or 0
        assert entry.revision is not None
        try:
            return model.model_validate_json(entry.value or b""), entry.revision
        except ValidationError:
            return model(), entry.revision

    async def _write(self, key: str, value: BaseModel, revision: int) -> bool:
        """Compare-and-set; False when another writer got there first."""
        try:
            await self._kv.update(key, value.model_dump_json().encode(), last=revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def history(self, session: str) -> SessionHistory:
        history, _ = await self._read(SessionHistory, naming.session_history_key(session))
        return history

    async def record(
        self, session: str, exchange: Exchange, summarize: Summarizer | None = None
    ) -> SessionHistory:
        """Append ``exchange`` to the session, the cap enforced (``fold``); with ``overflow:
        summarize`` the exchanges it drops are summarised by ``summarize`` first."""
        key = naming.session_history_key(session)
        for _ in range(CAS_ATTEMPTS):
            history, revision = await self._read(SessionHistory, key)
            folded, dropped = fold(history, exchange, self.policy)
            if folded is history:
                return history  # recorded before (a redelivery)
            if dropped and summarize is not None and self.policy.overflow == "summarize":
                folded = await self._summarised(folded, history, dropped, summarize)
            if await self._write(key, folded, revision):
                return folded
        raise SessionContended(f"{key}: lost {CAS_ATTEMPTS} compare-and-sets in a row")

    async def _summarised(
        self,
        folded: SessionHistory,
        history: SessionHistory,
        dropped: tuple[Exchange, ...],
        summarize: Summarizer,
    ) -> SessionHistory:
        """``folded`` with a new summary of what it dropped; when the model cannot give one,
        ``folded`` as it is (trimmed, the old summary kept): the answer is already given,
        and a summary is not worth failing it for."""
        try:
            summary = await summarize(summary_request(history, dropped))
        except Exception as error:
            logger.warning("no summary of %d older exchanges (trimmed): %s", len(dropped), error)
            return folded
        return summarised(folded, summary, self.policy)

    async def _change(
        self, session: str, change: Callable[[SessionQueue, float], SessionQueue | None]
    ) -> SessionQueue:
        """Apply ``change`` to the session's queue, compare-and-set; None: nothing to write."""
        key = naming.session_queue_key(session)
        for _ in range(CAS_ATTEMPTS):
            queue, revision = await self._read(SessionQueue, key)
            changed = change(queue, self._clock())
            if changed is None or await self._write(key, changed, revision):
                return changed if changed is not None else queue
        raise SessionContended(f"{key}: lost {CAS_ATTEMPTS} compare-and-sets in a row")

    async def enter(
        self, session: str, event: str, progress: Callable[[], Awaitable[None]]
    ) -> None:
        """Take ``event``'s place in the session's queue and wait until it is first;
        ``SessionBusy`` under ``reject`` when another message runs."""
        policy = self.policy.double_texting
        queue = await self._change(
            session, lambda q, now: admit(q, event, now, self._lease, policy)
        )
        while not queue.live(self._clock(), own=event).first(event):
            await progress()
            await self._sleep(POLL_SECONDS)
            queue = await self._change(session, lambda q, now: self._waiting(q, event, now))
        self._known(queue.slot(event))

    def _waiting(self, queue: SessionQueue, event: str, now: float) -> SessionQueue | None:
        """While waiting: drop expired slots, renew ``event``'s own (put it back if it was
        dropped), or write nothing."""
        live = queue.live(now, own=event)
        slot = live.slot(event)
        if slot is None:
            return admit(live, event, now, self._lease, "enqueue")
        if slot.expires - now < self._lease / 2:
            return live.renewed(event, now + self._lease)
        return live if live != queue else None

    def _renewal(self, event: str) -> Callable[[SessionQueue, float], SessionQueue | None]:
        """The change that renews ``event``'s slot once half its lease has passed."""

        def renew(queue: SessionQueue, now: float) -> SessionQueue | None:
            slot = queue.slot(event)
            if slot is None or slot.expires - now >= self._lease / 2:
                return None
            return queue.renewed(event, now + self._lease)

        return renew

    async def stop(self, session: str, event: str) -> StopMark | None:
        """Whether a newer message asked ``event`` to stop; renews its slot on the way."""
        slot = self._known((await self._change(session, self._renewal(event))).slot(event))
        return slot.stop if slot is not None else None

    async def renew(self, session: str, event: str) -> None:
        """Keep ``event``'s slot while it runs (its tools may outlast a lease between two
        turn boundaries); no I/O until half the lease it was last known to have has passed."""
        expires = self._expiries.get(event)
        if expires is not None and expires - self._clock() >= self._lease / 2:
            return
        self._known((await self._change(session, self._renewal(event))).slot(event))

    def _known(self, slot: Slot | None) -> Slot | None:
        """Remember when ``slot`` expires, for ``renew``."""
        if slot is not None:
            self._expiries[slot.event] = slot.expires
        return slot

    async def leave(self, session: str, event: str) -> None:
        """Give the session to the next message; a failure leaves the slot to expire."""
        self._expiries.pop(event, None)
        try:
            await self._change(
                session, lambda q, now: q.without(event) if q.slot(event) is not None else None
            )
        except Exception as error:
            logger.warning("could not leave session queue (it expires instead): %s", error)
