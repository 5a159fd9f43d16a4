"""How a message is settled, given how processing it ended (pure).

The worker describes the end of one message's processing as an ``Outcome``;
``decide`` turns it, with the Agent's retry policy, into a ``Settlement``:
acknowledge, hand back with a delay, or dead-letter with a reason. No I/O
happens here, so the same outcome and policy always yield the same settlement,
and the retry rules can be tested without a server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import assert_never

from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.dead_letters import DeadLetterReason
from troupe_runtime.contract.policies import retry_delay

EXPIRED_ERROR = "deadline passed"
OVERDELIVERED_ERROR = (
    "delivered {deliveries} times without an acknowledgement; "
    "the handler may crash or hang the process"
)


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


Outcome = (
    Succeeded
    | Malformed
    | Overdelivered
    | Expired
    | InvalidInput
    | InvalidOutput
    | Undelivered
    | AgentFailed
    | Failed
)


@dataclass(frozen=True)
class Policy:
    """What the Agent declared about retries."""

    max_attempts: int
    backoff: tuple[float, ...] = ()
    """Seconds before each redelivery; the last entry repeats, none means 0."""
    retryable: Mapping[str, bool] = field(default_factory=dict)
    """Error states by name; a state not declared is retryable."""

    @classmethod
    def of(cls, config: RuntimeConfig) -> Policy:
        return cls(
            max_attempts=config.retry.max_attempts,
            backoff=tuple(delay.total_seconds() for delay in config.retry.backoff),
            retryable={state.name: state.retryable for state in config.contract.error_states},
        )


@dataclass(frozen=True)
class Ack:
    """Done with the message: JetStream drops it."""


@dataclass(frozen=True)
class Nak:
    """Hand the message back, for another attempt after ``delay`` seconds."""

    delay: float
    error: str
    """What failed this attempt, for the log."""


@dataclass(frozen=True)
class DeadLetter:
    """Move the message to the dead-letter stream (tell ``replyto``), then acknowledge it."""

    reason: DeadLetterReason
    error: str


Settlement = Ack | Nak | DeadLetter


def decide(outcome: Outcome, policy: Policy) -> Settlement:
    """The settlement of a message whose processing ended in ``outcome``."""
    match outcome:
        case Succeeded():
            return Ack()
        case Malformed(reason):
            return DeadLetter(DeadLetterReason.MALFORMED, reason)
        case Overdelivered(deliveries):
            error = OVERDELIVERED_ERROR.format(deliveries=deliveries)
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
        case _:
            assert_never(outcome)


def _retry(error: str, attempt: int, policy: Policy) -> Settlement:
    """Another attempt with the declared backoff, unless this was the last one allowed."""
    if attempt >= policy.max_attempts:
        return DeadLetter(DeadLetterReason.EXHAUSTED, error)
    return Nak(retry_delay(policy.backoff, attempt), error)
