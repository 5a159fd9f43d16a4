"""Provider limits shared through NATS KV: two routers (two replicas, or two agents using the
same provider) spend one requests-per-minute budget."""

from __future__ import annotations

import uuid

import nats
import pytest

from tests.unit.llm_client_support import provider, runtime
from troupe_devcluster.scripted_llm import ScriptedLlm, Text
from troupe_runtime.agent.llm.router import ModelRouter
from troupe_runtime.agent.llm.types import ChatRequest, RateLimited
from troupe_runtime.contract.naming import provider_limit_key

ASK = ChatRequest(messages=[{"role": "user", "content": "hello"}])


async def test_two_routers_share_one_provider_budget(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    bucket = f"limits-{uuid.uuid4().hex[:8]}"
    kv = await js.create_key_value(bucket=bucket)
    # 6 a minute: bursts of one, then one every 10 s.
    config = runtime(
        [("shared", "m")],
        [provider("shared", scripted_llm.base_url, limits={"requestsPerMinute": 6})],
    )
    first, second = ModelRouter(config, {}, kv), ModelRouter(config, {}, kv, max_limit_wait=0.1)
    scripted_llm.script(Text("one"), Text("two"))
    try:
        assert (await first.complete(ASK, None)).message["content"] == "one"
        with pytest.raises(RateLimited) as caught:
            await second.complete(ASK, None)
        assert caught.value.retry_after is not None
        assert 8 < caught.value.retry_after <= 10
        assert len(scripted_llm.completions) == 1
        assert (await kv.get(provider_limit_key("shared", "rpm"))).value
    finally:
        await first.aclose()
        await second.aclose()
        await js.delete_key_value(bucket)
        await nc.close()


async def test_tokens_a_completion_used_are_charged_to_the_shared_budget(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    bucket = f"limits-{uuid.uuid4().hex[:8]}"
    kv = await js.create_key_value(bucket=bucket)
    # 600 tokens a minute: bursts of 100; the request is estimated at 2, the answer used 100.
    config = runtime(
        [("shared", "m")],
        [provider("shared", scripted_llm.base_url, limits={"tokensPerMinute": 600})],
    )
    first, second = ModelRouter(config, {}, kv), ModelRouter(config, {}, kv, max_limit_wait=0.05)
    scripted_llm.script(Text("long answer", usage=(10, 90)), Text("never"))
    try:
        await first.complete(ASK, None)
        with pytest.raises(RateLimited):
            await second.complete(ASK, None)
        assert len(scripted_llm.completions) == 1
    finally:
        await first.aclose()
        await second.aclose()
        await js.delete_key_value(bucket)
        await nc.close()
