"""Token deltas on core NATS, against a real nats-server: a flood of tiny deltas is bounded."""

from __future__ import annotations

import json
from typing import Any

import nats

from troupe_runtime.agent.llm.streaming import MAX_DELTA_MESSAGES, TokenStream


async def test_a_model_streaming_one_character_at_a_time_sends_a_bounded_number_of_messages(
    nats_url: str,
) -> None:
    nc = await nats.connect(nats_url)
    try:
        stream = TokenStream(nc, "troupe.t.streams.a.b")
        subscription = await nc.subscribe(stream.subject)
        text = "ab" * MAX_DELTA_MESSAGES
        for character in text:
            await stream.delta(character, 0)
        await stream.done(0, final=True)
        received: list[dict[str, Any]] = []
        while not received or not received[-1].get("done"):
            received.append(json.loads((await subscription.next_msg(timeout=10)).data))
    finally:
        await nc.close()
    deltas = [message["delta"] for message in received if "delta" in message]
    assert len(deltas) == MAX_DELTA_MESSAGES + 1  # the rest held, then sent whole
    assert "".join(deltas) == text  # nothing lost, in order
