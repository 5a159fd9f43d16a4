"""Retries against KV are bounded: ``create`` on a key that flickers in and out gives up."""

from __future__ import annotations

import uuid

import nats
import pytest
from nats.js.api import StreamConfig
from nats.js.kv import KeyValue

from troupe_runtime.contract.state_errors import KeyExistsError
from troupe_runtime.nats.kv import KeyValueRevisions


async def test_create_gives_up_on_a_key_present_at_every_write_and_gone_at_every_check(
    nats_url: str,
) -> None:
    """A key's lease expiring between nats-py's write and its check, every single time.

    Writes go to the bucket, where the key exists (so the write fails); checks
    read a stream where it never does (so nats-py says it is gone): the pattern
    a TTL'd lease produces by chance, here produced on every try.
    """
    token = uuid.uuid4().hex[:10]
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        bucket = await js.create_key_value(bucket=f"flicker_{token}")
        await bucket.put("lease", b"{}")
        await js.add_stream(
            StreamConfig(name=f"ELSEWHERE_{token}", subjects=[f"elsewhere.{token}"])
        )
        split = KeyValue(
            name=f"flicker_{token}",
            stream=f"ELSEWHERE_{token}",
            pre=f"$KV.flicker_{token}.",
            js=js,
            direct=False,
        )
        with pytest.raises(KeyExistsError, match="already exists in state bucket 'flicker'"):
            await KeyValueRevisions(split, "flicker", None).create("lease", {"holder": "me"})
    finally:
        await nc.close()
