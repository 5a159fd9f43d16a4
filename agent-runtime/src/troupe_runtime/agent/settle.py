"""How a message is settled, given how processing it ended (pure).

The worker describes the end of one message's processing as an ``Outcome``;
``decide`` turns it, with the Agent's retry policy, into a ``Settlement``:
acknowledge, hand back with a delay, or dead-letter with a reason. No I/O
happens here (jitter comes from an injected random source), so the same
outcome, policy and draw always yield the same settlement, and the retry rules
can be tested without a server.

Attempts and deliveries. An LLM agent may *defer* a message (a 429 whose
Retry-After outlasts the handler's time): it is handed back after the delay
and that delivery burns no attempt, so the effective attempt is
``deliveries - deferrals``. Only the handler knows the deferrals (the loop
journals them): it says so with ``DeferMessage(deferrals=k)``, or, on a
redelivery it resumes, with ``Context.set_deferrals(k)``, which also refuses
to go on once no attempt is left (``AttemptsExhausted``: the message is
dead-lettered as ``max-deliveries`` without calling the model again).
Before the handler runs, deferrals are unknown, so the runtime can only check
raw deliveries against the worst case, ``maxAttempts + max_deferrals``
(``maxAttempts`` for every agent that cannot defer); the consumers allow one
delivery more (``max_deliveries``), on which the message is dead-lettered
without running the handler. Past ``MAX_DEFERRALS`` deferrals the message
is dead-lettered as ``rate-limited``: a provider that throttles it twenty
times will not serve it soon.

An agent that cannot defer (no ``spec.llm``: its consumers have no spare
deliveries) treats ``DeferMessage`` as an ordinary failed attempt, retried no
sooner than the delay asked for.

Model failures: ``ModelFailed`` (unavailable, or rate limited with no usable
Retry-After) is retried with the declared backoff, jittered by ±20% so a
provider's outage does not come back as one synchronised wave of retries.

Budgets: a hard limit that refused a model call (``OverBudget``) is
dead-lettered as ``budget-exceeded`` at once: the window's spending only grows,
so another attempt would be refused again (or, worse, get in once the window
turns and spend what the limit was meant to stop).

Sessions: a message its session refuses (``doubleTexting: reject`` while another runs) or
that a newer one stopped (``rollback``, or ``interrupt`` with structured output) is
``SessionRefused`` and dead-lettered with the reason at once: another attempt would meet
the same session.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, assert_never

from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.agent_resources import max_deferrals
from troupe_runtime.contract.dead_letters import DeadLetterReason
from troupe_runtime.contract.policies import retry_delay

EXPIRED_ERROR = "deadline passed"
OVERDELIVERED_ERROR = (
    "delivered {deliveries} times without an acknowledgement; "
    "the handler may crash or hang the process"
)
DEFERRED_ERROR = (
    "deferred {deferrals} times, more than the {allowed} an LLM agent allows "
    "(each a 429 with Retry-After from every model of the chain); last: {error}"
)
CANNOT_DEFER_ERROR = "{error} (not deferred: only an LLM agent's inbox has deliveries to spare)"
JITTER = 0.2
"""Model-failure retries wait the declared backoff times a factor in [1 - JITTER, 1 + JITTER]."""
MAX_DEFER_SECONDS = 3600.0
"""The longest a deferral waits, whatever Retry-After says."""

Random = Callable[[], float]
"""A draw from [0, 1): ``random.random``, or a fixed one in tests."""


def effective_attempt(deliveries: int, deferrals: int) -> int:
    """The attempt a delivery is, when ``deferrals`` earlier deliveries were deferred."""
    return deliveries - deferrals


@dataclass(frozen=True)
class Succeeded:
    """The handler finished and JetStream stored every output and the reply."""

    outputs: int
    """How many outputs were published, for the log."""


@dataclass(frozen=True)
class Malformed:
    """The message is not a usable CloudEvent; retrying cannot help."""

    reason: str


@dataclass(frozen=True)
class Overdelivered:
    """Delivered more often than the Agent allows attempts: no earlier delivery was
    settled (the process crashed or hung every time), so the handler must not run again.

    The inbox consumers allow one delivery more than ``retry.maxAttempts`` for this: the
    replica that gets it dead-letters the message itself, at once, whatever else it is
    doing; the server's MAX_DELIVERIES advisory is only the fallback.
    """

    deliveries: int
    deferrals: int = 0
    """Of those, how many were deferred (known once the handler read its journal)."""


@dataclass(frozen=True)
class Deferred:
    """The handler asked to be run again after ``delay`` seconds, burning no attempt
    (an LLM agent's 429); ``deferrals`` counts this message's deferrals, this one included."""

    delay: float
    deferrals: int
    error: str
    attempt: int
    """The effective attempt this delivery would have been."""


@dataclass(frozen=True)
class ModelRefused:
    """The model refused the request (400, 401, 403, 404, 413, context length): the same
    request fails again. ``error`` is the provider's message, redacted."""

    error: str


@dataclass(frozen=True)
class ModelFailed:
    """Every model tried was unavailable (5xx, timeouts) or rate limited with no usable
    Retry-After: worth another attempt later, jittered; never sooner than ``not_before``."""

    error: str
    attempt: int
    not_before: float = 0.0


@dataclass(frozen=True)
class OverBudget:
    """A Budget's hard limit refused a model call (``BudgetExceeded``); the call was not made."""

    error: str
    reason: ClassVar[DeadLetterReason] = DeadLetterReason.BUDGET_EXCEEDED


@dataclass(frozen=True)
class SessionRefused:
    """The session refused the message (``SessionBusy`` under ``reject``) or a newer message
    of it stopped this one (``SessionStopped``): the same message would fare no better, so it
    is dead-lettered with ``reason``."""

    reason: DeadLetterReason
    error: str


@dataclass(frozen=True)
class Expired:
    """The event's deadline passed before the handler started; its result is unwanted."""


@dataclass(frozen=True)
class InvalidInput:
    """The input data violates the contract's input schema; retrying cannot help."""

    reason: str


@dataclass(frozen=True)
class InvalidOutput:
    """The handler produced data that violates the output schema; it would again."""

    reason: str


@dataclass(frozen=True)
class AgentFailed:
    """The handler raised an ``AgentError`` naming one of the contract's error states.

    Whether trying again can help is the state's to say, in the policy.
    """

    state: str
    error: str
    attempt: int


@dataclass(frozen=True)
class Failed:
    """Anything else failed (the handler, its timeout, publishing); it may pass next time."""

    error: str
    attempt: int


@dataclass(frozen=True)
class Undelivered:
    """An output or the reply can never be stored (too large for the server with its
    headers, or no stream stores its subject); another attempt would re-run the handler."""

    reason: str


@dataclass(frozen=True)
class Parked:
    """The handler parked the message: it waits, journaled, for a person's decision
    (``approval``), which resumes it; nothing is replied yet."""

    approval: str


Outcome = (
    Succeeded
    | Parked
    | Malformed
    | Overdelivered
    | Expired
    | InvalidInput
    | InvalidOutput
    | Undelivered
    | AgentFailed
    | Failed
    | Deferred
    | ModelRefused
    | ModelFailed
    | OverBudget
    | SessionRefused
)


@dataclass(frozen=True)
class Policy:
    """What the Agent declared about retries."""

    max_attempts: int
    backoff: tuple[float, ...] = ()
    """Seconds before each redelivery; the last entry repeats, none means 0."""
    retryable: Mapping[str, bool] = field(default_factory=dict)
    """Error states by name; a state not declared is retryable."""
    max_deferrals: int = 0
    """Deferrals a message may take; ``MAX_DEFERRALS`` for an LLM agent, else none."""

    @classmethod
    def of(cls, config: RuntimeConfig) -> Policy:
        return cls(
            max_attempts=config.retry.max_attempts,
            backoff=tuple(delay.total_seconds() for delay in config.retry.backoff),
            retryable={state.name: state.retryable for state in config.contract.error_states},
            max_deferrals=max_deferrals(config),
        )

    def overdelivered(self, deliveries: int) -> bool:
        """Whether a delivery is past every attempt and every deferral the message may
        take, whatever its deferrals turn out to be: the handler must not run."""
        return deliveries > self.max_attempts + self.max_deferrals

    def exhausted(self, deliveries: int, deferrals: int) -> bool:
        """Whether a delivery, knowing its earlier deferrals, leaves no attempt to run."""
        return effective_attempt(deliveries, deferrals) > self.max_attempts


@dataclass(frozen=True)
class Ack:
    """Done with the message: JetStream drops it."""


@dataclass(frozen=True)
class Nak:
    """Hand the message back, for another attempt after ``delay`` seconds."""

    delay: float
    error: str
    """What failed this attempt, for the log."""
    counted: bool = True
    """False for a deferral: the delivery burnt no attempt."""


@dataclass(frozen=True)
class DeadLetter:
    """Move the message to the dead-letter stream (tell ``replyto``), then acknowledge it."""

    reason: DeadLetterReason
    error: str


Settlement = Ack | Nak | DeadLetter


def decide(outcome: Outcome, policy: Policy, draw: Random = random.random) -> Settlement:
    """The settlement of a message whose processing ended in ``outcome``; ``draw`` jitters
    the retries of model failures."""
    match outcome:
        case Succeeded() | Parked():
            return Ack()
        case Malformed(reason):
            return DeadLetter(DeadLetterReason.MALFORMED, reason)
        case Overdelivered(deliveries, deferrals):
            error = OVERDELIVERED_ERROR.format(deliveries=deliveries)
            if deferrals:
                error += f" ({deferrals} of them deferred, which burn no attempt)"
            return DeadLetter(DeadLetterReason.MAX_DELIVERIES, error)
        case Expired():
            return DeadLetter(DeadLetterReason.EXPIRED, EXPIRED_ERROR)
        case InvalidInput(reason):
            return DeadLetter(DeadLetterReason.INVALID_INPUT, reason)
        case InvalidOutput(reason):
            return DeadLetter(DeadLetterReason.INVALID_OUTPUT, reason)
        case Undelivered(reason):
            return DeadLetter(DeadLetterReason.UNDELIVERABLE, reason)
        case AgentFailed(state, error) if not policy.retryable.get(state, True):
            return DeadLetter(DeadLetterReason.REJECTED, error)
        case AgentFailed(_, error, attempt) | Failed(error, attempt):
            return _retry(error, attempt, policy)
        case ModelRefused(error):
            return DeadLetter(DeadLetterReason.REJECTED, error)
        case ModelFailed(error, attempt, not_before):
            return _retry(error, attempt, policy, jitter=draw, not_before=not_before)
        case OverBudget() | SessionRefused():
            return DeadLetter(outcome.reason, outcome.error)
        case Deferred():
            return _defer(outcome, policy)
        case _:
            assert_never(outcome)


def _defer(outcome: Deferred, policy: Policy) -> Settlement:
    """Hand back for the delay asked, burning no attempt, while deferrals are left."""
    delay = _bounded(outcome.delay)
    if policy.max_deferrals == 0:
        error = CANNOT_DEFER_ERROR.format(error=outcome.error)
        return _retry(error, outcome.attempt, policy, not_before=delay)
    if outcome.deferrals > policy.max_deferrals:
        error = DEFERRED_ERROR.format(
            deferrals=outcome.deferrals, allowed=policy.max_deferrals, error=outcome.error
        )
        return DeadLetter(DeadLetterReason.RATE_LIMITED, error)
    return Nak(delay, outcome.error, counted=False)


def _bounded(delay: float) -> float:
    """A delay from a provider's Retry-After, as JetStream can wait it."""
    if not math.isfinite(delay) or delay < 0:
        return 0.0
    return min(delay, MAX_DEFER_SECONDS)


def _retry(
    error: str,
    attempt: int,
    policy: Policy,
    *,
    jitter: Random | None = None,
    not_before: float = 0.0,
) -> Settlement:
    """Another attempt with the declared backoff (jittered when ``jitter`` draws), no
    sooner than ``not_before``, unless this was the last attempt allowed."""
    if attempt >= policy.max_attempts:
        return DeadLetter(DeadLetterReason.EXHAUSTED, error)
    delay = retry_delay(policy.backoff, attempt)
    if jitter is not None:
        delay *= 1 - JITTER + 2 * JITTER * jitter()
    return Nak(max(delay, _bounded(not_before)), error)
