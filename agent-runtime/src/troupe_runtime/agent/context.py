"""The handler SDK: what a handler receives, and the errors it may raise.

A handler is ``async def handle(ctx: Context) -> data | None`` (or a plain
function, run in a thread). Its return value, when not None, is published as
one output event; ``await ctx.publish(...)`` publishes more, at once, each
with an id derived from the input's, so a redelivered input republishes the
same ids and JetStream drops the duplicates.

``ctx.event.data`` is decoded by its content type (``ctx.content_type``): JSON
as Python values, ``text/*`` as ``str``, anything else as ``bytes``. A handler
that returns ``str`` or ``bytes`` in answer to non-JSON data publishes it with
the input's content type, so an echo keeps ``text/plain`` as ``text/plain``.

``ctx.attempt`` counts attempts, not deliveries: a delivery an LLM agent
deferred (``DeferMessage``, a 429) burns none. A handler that knows its
message's earlier deferrals (the loop, from its journal) says so with
``ctx.set_deferrals``, before it does anything the attempt limit should stop.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from nats.aio.msg import Msg

from troupe_runtime.agent.settle import effective_attempt
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.policies import RetryPolicy
from troupe_runtime.state import StateStore

Publisher = Callable[[Any, str | None, str | None], Awaitable[None]]


class AgentError(Exception):
    """Raise to fail with one of the contract's named error states.

    A state declared ``retryable: false`` sends the message straight to the
    dead-letter stream; any other error is retried.
    """

    def __init__(self, state: str, message: str = "") -> None:
        super().__init__(f"{state}: {message}" if message else state)
        self.state = state


class AttemptsExhausted(Exception):
    """Raised by ``Context.set_deferrals`` when, deferrals aside, every attempt was made:
    the earlier deliveries crashed or hung. Let it propagate; the message is dead-lettered
    as ``max-deliveries`` without running the rest of the handler."""

    def __init__(self, deliveries: int, deferrals: int) -> None:
        super().__init__(
            f"delivered {deliveries} times, {deferrals} of them deferred: no attempt is left"
        )
        self.deliveries = deliveries
        self.deferrals = deferrals


class Context:
    """One message's view of the runtime."""

    def __init__(
        self,
        event: CloudEvent,
        *,
        attempt: int,
        state: StateStore,
        logger: logging.Logger,
        publisher: Publisher,
        progress: Callable[[], Awaitable[None]],
        max_attempts: int = RetryPolicy().max_attempts,
        resumed: bool = False,
    ) -> None:
        self.event = event
        self.deliveries = attempt
        """How often JetStream delivered the message, this time included."""
        self.resumed = resumed
        """Whether the message was parked and a decision resumes it (an LLM agent's tool-call
        approval): its journal must be read, whatever ``deliveries`` says."""
        self.max_attempts = max_attempts
        """The Agent's ``retry.maxAttempts``."""
        self._deferrals = 0
        self.state = state
        self.logger = logger
        self._publisher = publisher
        self._progress = progress
        self.attributes: dict[str, Any] = {}
        """Extension attributes put on every output and the reply of this message (an LLM
        agent's token usage); set them before returning."""

    @property
    def attempt(self) -> int:
        """This delivery's attempt, from 1: deliveries less the deferred ones."""
        return effective_attempt(self.deliveries, self._deferrals)

    @property
    def deferrals(self) -> int:
        """Earlier deliveries of this message that were deferred, as the handler said."""
        return self._deferrals

    def set_deferrals(self, count: int) -> None:
        """Say how often this message was deferred before (an LLM agent's journal knows);
        raises ``AttemptsExhausted`` when that leaves no attempt for this delivery.

        Call it on every redelivery, with 0 too, before anything costly: it is what stops a
        message whose earlier deliveries crashed, since the runtime alone cannot tell
        them from deferrals (it allows every delivery a deferral might have taken)."""
        if not 0 <= count < self.deliveries:
            raise ValueError(
                f"{count} earlier deferrals: a message delivered {self.deliveries} times "
                f"has between 0 and {self.deliveries - 1}"
            )
        self._deferrals = count
        if self.attempt > self.max_attempts:
            raise AttemptsExhausted(self.deliveries, count)

    @property
    def content_type(self) -> str | None:
        """The input's ``datacontenttype`` (None: JSON, Troupe's default)."""
        return self.event.datacontenttype

    async def publish(
        self, data: Any, *, type: str | None = None, subject: str | None = None
    ) -> None:
        """Publish an output event now, to ``subject`` or to every output subject."""
        await self._publisher(data, type, subject)

    async def progress(self) -> None:
        """Tell JetStream and the timeout that the handler is still working."""
        await self._progress()


HandlerFn = Callable[[Context], Awaitable[Any]]


class DecisionIntake(Protocol):
    """Takes the decisions that resume parked messages (an LLM agent's tool-call approvals):
    they arrive on ``subject``, beside the inbox."""

    subject: str

    async def take(self, msg: Msg) -> CloudEvent | None:
        """The parked message a decision resumes, or None when it changes nothing."""
        ...
