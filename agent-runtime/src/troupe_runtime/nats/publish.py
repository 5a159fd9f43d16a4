"""JetStream publishes that tell "no stream stores this subject" apart from a slow server.

A JetStream publish to a subject no stream stores gets "no responders" at
once, or, when something subscribes to the subject without storing it, a
timeout. Either way retrying cannot help, and a caller that retries re-runs
whatever led to the publish. ``NoStream`` says so; a timeout on a subject a
stream does store stays a ``TimeoutError``, worth another attempt.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NoStreamResponseError, NotFoundError


class NoStream(Exception):
    """No stream stores ``subject``: a publish there is never stored."""

    def __init__(self, subject: str, detail: str) -> None:
        super().__init__(
            f"no stream stores subject {subject!r} ({detail}); create a stream for it "
            "or publish elsewhere"
        )
        self.subject = subject


def max_payload(js: JetStreamContext) -> int:
    """The largest message (payload and headers) the connected server accepts."""
    return js._nc.max_payload


async def publish_stored(
    js: JetStreamContext, subject: str, payload: bytes, headers: dict[str, str]
) -> PubAck:
    """Publish and wait until a stream stored it; ``NoStream`` when none ever will."""
    try:
        return await js.publish(subject, payload, headers=headers)
    except NoStreamResponseError as error:
        raise NoStream(subject, "JetStream answered: no responders") from error
    except TimeoutError:
        if await _stored_by_a_stream(js, subject):
            raise
        raise NoStream(subject, "the publish timed out, and no stream lists it") from None


async def _stored_by_a_stream(js: JetStreamContext, subject: str) -> bool:
    try:
        await js.find_stream_name_by_subject(subject)
    except NotFoundError:
        return False
    return True
