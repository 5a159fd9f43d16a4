"""Reading back what a stream holds for one subject, in order."""

from __future__ import annotations

from nats.js import JetStreamContext

from troupe_runtime.contract.run_events import Event, decode_event

REPLAY_TIMEOUT_SECONDS = 5.0


async def read_events(js: JetStreamContext, stream: str, subject: str) -> list[Event]:
    """Every event on one run's subject, in order."""
    info = await js.stream_info(stream, subjects_filter=subject)
    count = (info.state.subjects or {}).get(subject, 0)
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
