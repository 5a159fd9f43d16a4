"""The router over real scripted servers: fallback on 429, 5xx and timeouts, no fallback on
a rejection, circuit breakers, provider limits, and usage on every completion."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.unit.llm_client_support import provider, runtime
from troupe_devcluster.scripted_llm import HttpError, ScriptedLlm, Text
from troupe_runtime.agent.llm.router import ModelRouter
from troupe_runtime.agent.llm.types import (
    ChatRequest,
    Fallback,
    ModelRejected,
    ModelUnavailable,
    RateLimited,
)

ASK = ChatRequest(messages=[{"role": "user", "content": "Summarise the findings."}])


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def backup() -> Iterator[ScriptedLlm]:
    """A second provider's server."""
    with ScriptedLlm() as server:
        yield server


def two_providers(
    primary: ScriptedLlm,
    backup: ScriptedLlm,
    clock: FakeClock | None = None,
    call_timeout: float = 120.0,
) -> ModelRouter:
    """main/big first, then backup/small."""
    config = runtime(
        [("main", "big"), ("backup", "small")],
        [
            provider("main", primary.base_url, ("big",)),
            provider("backup", backup.base_url, ("small",)),
        ],
    )
    return ModelRouter(config, {}, clock=clock or FakeClock(), call_timeout=call_timeout)


async def test_first_model_answers_without_fallbacks(
    scripted_llm: ScriptedLlm, backup: ScriptedLlm
) -> None:
    scripted_llm.script(Text("done"))
    router = two_providers(scripted_llm, backup)
    completion = await router.complete(ASK, None)
    await router.aclose()
    assert (completion.provider, completion.model, completion.fallbacks) == ("main", "big", ())
    assert backup.completions == []


async def test_429_falls_back_and_records_it(
    scripted_llm: ScriptedLlm, backup: ScriptedLlm
) -> None:
    scripted_llm.script(HttpError(429, "slow down", headers={"Retry-After": "20"}))
    backup.script(Text("from the backup"))
    router = two_providers(scripted_llm, backup)
    completion = await router.complete(ASK, None)
    await router.aclose()
    assert completion.message["content"] == "from the backup"
    assert (completion.provider, completion.model) == ("backup", "small")
    (fallback,) = completion.fallbacks
    assert (fallback.provider, fallback.model, fallback.reason) == ("main", "big", "rate_limited")
    assert "slow down" in fallback.error
    assert backup.completions[0].body["model"] == "small"


async def test_every_model_429_is_rate_limited_with_the_smallest_retry_after(
    scripted_llm: ScriptedLlm, backup: ScriptedLlm
) -> None:
    scripted_llm.script(HttpError(429, headers={"Retry-After": "20"}))
    backup.script(HttpError(429, headers={"Retry-After": "5"}))
    router = two_providers(scripted_llm, backup)
    with pytest.raises(RateLimited) as caught:
        await router.complete(ASK, None)
    await router.aclose()
    assert caught.value.retry_after == 5


async def test_5xx_falls_back_and_the_fallback_answers(
    scripted_llm: ScriptedLlm, backup: ScriptedLlm
) -> None:
    scripted_llm.script(HttpError(503, "overloaded"))
    backup.script(Text("ok"))
    router = two_providers(scripted_llm, backup)
    completion = await router.complete(ASK, None)
    await router.aclose()
    assert completion.provider == "backup"
    assert [f.reason for f in completion.fallbacks] == ["unavailable"]


async def test_a_timeout_falls_back(scripted_llm: ScriptedLlm, backup: ScriptedLlm) -> None:
    scripted_llm.script(Text("too late", delay=10))
    backup.script(Text("in time"))
    router = two_providers(scripted_llm, backup, call_timeout=0.3)
    completion = await router.complete(ASK, None)
    await router.aclose()
    assert completion.message["content"] == "in time"
    assert [f.reason for f in completion.fallbacks] == ["timeout"]


async def test_context_length_is_rejected_and_not_retried(
    scripted_llm: ScriptedLlm, backup: ScriptedLlm
) -> None:
    scripted_llm.script(HttpError(400, "This model's maximum context length is 4096 tokens"))
    backup.script(Text("never asked"))
    router = two_providers(scripted_llm, backup)
    with pytest.raises(ModelRejected, match="maximum context length") as caught:
        await router.complete(ASK, None)
    await router.aclose()
    assert caught.value.status == 400
    assert backup.completions == []
    assert len(scripted_llm.completions) == 1


async def test_mixed_failures_end_unavailable(
    scripted_llm: ScriptedLlm, backup: ScriptedLlm
) -> None:
    scripted_llm.script(HttpError(429, headers={"Retry-After": "3"}))
    backup.script(HttpError(502, "bad gateway"))
    router = two_providers(scripted_llm, backup)
    with pytest.raises(ModelUnavailable, match="bad gateway"):
        await router.complete(ASK, None)
    await router.aclose()


async def test_circuit_opens_after_5_failures_and_skips_the_provider(
    scripted_llm: ScriptedLlm, backup: ScriptedLlm
) -> None:
    clock = FakeClock()
    scripted_llm.script(*[HttpError(500, "down")] * 5)
    backup.script(*[Text("backup")] * 7)
    router = two_providers(scripted_llm, backup, clock)
    for _ in range(5):
        assert (await router.complete(ASK, None)).provider == "backup"
    assert router.breaker("main").state == "open"

    skipped = await router.complete(ASK, None)
    assert len(scripted_llm.completions) == 5  # main was not asked
    assert skipped.fallbacks == (
        Fallback("main", "big", "circuit_open", "main: circuit open after 5 consecutive failures"),
    )

    clock.now += 30  # half-open: one trial goes to main, and it answers
    scripted_llm.script(Text("main is back"))
    trial = await router.complete(ASK, None)
    await router.aclose()
    assert (trial.provider, trial.fallbacks) == ("main", ())
    assert router.breaker("main").state == "closed"


async def test_usage_absent_is_estimated(scripted_llm: ScriptedLlm, backup: ScriptedLlm) -> None:
    scripted_llm.script(Text("A short summary.", usage=None))
    router = two_providers(scripted_llm, backup)
    completion = await router.complete(ASK, None)
    await router.aclose()
    assert completion.usage.estimated
    assert (completion.usage.tokens_in, completion.usage.tokens_out) == (6, 4)


async def test_streaming_deltas_arrive_in_order_through_a_fallback(
    scripted_llm: ScriptedLlm, backup: ScriptedLlm
) -> None:
    scripted_llm.script(HttpError(503))
    backup.script(Text("one two three"))
    got: list[str] = []

    async def on_delta(text: str) -> None:
        got.append(text)

    router = two_providers(scripted_llm, backup)
    completion = await router.complete(ASK, on_delta)
    await router.aclose()
    assert got == ["one", " two", " three"]
    assert completion.message["content"] == "one two three"


async def test_a_spent_request_budget_falls_back_then_rate_limits(
    scripted_llm: ScriptedLlm, backup: ScriptedLlm
) -> None:
    # 6 per minute: bursts of one (ten seconds' worth), the next token in 10 s.
    config = runtime(
        [("main", "big"), ("backup", "small")],
        [
            provider("main", scripted_llm.base_url, ("big",), limits={"requestsPerMinute": 6}),
            provider("backup", backup.base_url, ("small",), limits={"requestsPerMinute": 6}),
        ],
    )
    router = ModelRouter(config, {}, max_limit_wait=0.05)
    scripted_llm.script(Text("first"))
    backup.script(Text("second"))
    assert (await router.complete(ASK, None)).provider == "main"
    second = await router.complete(ASK, None)
    assert second.provider == "backup"
    assert [f.reason for f in second.fallbacks] == ["rate_limited"]
    with pytest.raises(RateLimited) as caught:
        await router.complete(ASK, None)
    await router.aclose()
    assert caught.value.retry_after is not None
    assert 9 < caught.value.retry_after <= 10
    assert len(scripted_llm.completions) == len(backup.completions) == 1


async def test_a_short_wait_for_the_budget_is_waited_in_place(scripted_llm: ScriptedLlm) -> None:
    # 600 per minute: bursts of 100, then one every 0.1 s.
    config = runtime(
        [("main", "big")],
        [provider("main", scripted_llm.base_url, ("big",), limits={"tokensPerMinute": 600})],
    )
    router = ModelRouter(config, {}, max_limit_wait=1.0)
    scripted_llm.script(Text("a"), Text("b"))
    big = ChatRequest(messages=[{"role": "user", "content": "x" * 396}])  # 99 tokens
    small = ChatRequest(messages=[{"role": "user", "content": "x" * 8}])  # 2 tokens
    started = asyncio.get_running_loop().time()
    assert (await router.complete(big, None)).fallbacks == ()
    assert (await router.complete(small, None)).fallbacks == ()  # one token short: 0.1 s
    assert asyncio.get_running_loop().time() - started >= 0.1
    await router.aclose()


def test_a_chain_naming_an_unresolved_provider_is_refused(scripted_llm: ScriptedLlm) -> None:
    config = runtime(
        [("main", "big"), ("ghost", "m")], [provider("main", scripted_llm.base_url, ("big",))]
    )
    with pytest.raises(ValueError, match="'ghost'"):
        ModelRouter(config, {})


@pytest.mark.parametrize(("usage", "limited"), [((1, 1), False), ((10, 90), True)])
async def test_tokens_used_beyond_the_estimate_are_charged_after_the_call(
    scripted_llm: ScriptedLlm, usage: tuple[int, int], limited: bool
) -> None:
    # 600 tokens a minute: bursts of 100, then ten a second. The request is estimated at 2.
    config = runtime(
        [("main", "big")],
        [provider("main", scripted_llm.base_url, ("big",), limits={"tokensPerMinute": 600})],
    )
    router = ModelRouter(config, {}, max_limit_wait=0.05)
    scripted_llm.script(Text("x", usage=usage), Text("y"))
    small = ChatRequest(messages=[{"role": "user", "content": "x" * 8}])
    await router.complete(small, None)
    try:
        if limited:
            with pytest.raises(RateLimited):
                await router.complete(small, None)
        else:
            assert (await router.complete(small, None)).message["content"] == "y"
    finally:
        await router.aclose()
