"""Reading back what a stream holds for one subject, in order, and how many messages
its subjects hold, from the server's subject index rather than the messages."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from troupe_runtime.contract.run_events import Event, decode_event

REPLAY_TIMEOUT_SECONDS = 5.0
Found = tuple[int, bytes] | None
"""A message's sequence and data, or None when the subject holds none."""


async def subject_counts(js: JetStreamContext, stream: str, subjects: str) -> dict[str, int]:
    """Messages per subject matching ``subjects`` (a wildcard), as the server indexes them:
    the answer grows with the matching subjects, not with the stream."""
    info = await js.stream_info(stream, subjects_filter=subjects)
    return dict(info.state.subjects or {})


async def read_events(js: JetStreamContext, stream: str, subject: str) -> list[Event]:
    """Every event on one run's subject, in order."""
    count = (await subject_counts(js, stream, subject)).get(subject, 0)
    if count == 0:
        return []
    subscription = await js.subscribe(subject, ordered_consumer=True)
    try:
        return [
            decode_event((await subscription.next_msg(REPLAY_TIMEOUT_SECONDS)).data)
            for _ in range(count)
        ]
    finally:
        await subscription.unsubscribe()


async def first_message(js: JetStreamContext, stream: str, subject: str) -> Found:
    """The oldest message on ``subject``: its sequence and data; None when there is none."""
    try:
        msg = await js.get_msg(stream, seq=1, next=True, subject=subject)
    except NotFoundError:
        return None
    assert msg.seq is not None
    return msg.seq, msg.data or b""


async def last_message(js: JetStreamContext, stream: str, subject: str) -> Found:
    """The newest message on ``subject`` (a wildcard too); None when there is none."""
    try:
        msg = await js.get_last_msg(stream, subject)
    except NotFoundError:
        return None
    assert msg.seq is not None
    return msg.seq, msg.data or b""
