"""Budgets and token rate limits in the LLM agent, without a NATS server: the router's holds
(against scripted model servers, with a fake guard), the agent's own tokens per minute, the
provider rpm token given back when tpm throttles, the loop's answer on a refusal, each
turn's SpendContext, the Workflow attribute, and how a refusal is settled."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from tests.unit.llm_client_support import provider, runtime
from troupe_devcluster.scripted_llm import HttpError, ScriptedLlm, Text
from troupe_runtime.agent.llm.handler import hold_id, spending
from troupe_runtime.agent.llm.history import Offloader
from troupe_runtime.agent.llm.journal import Journal, ResumeState
from troupe_runtime.agent.llm.loop import BUDGET_STOP, Conversation, LoopSettings
from troupe_runtime.agent.llm.router import (
    DEFAULT_BUDGET_MAX_TOKENS,
    Held,
    ModelRouter,
    agent_token_limiter,
)
from troupe_runtime.agent.llm.streaming import TokenStream
from troupe_runtime.agent.llm.tokens import estimate_tokens
from troupe_runtime.agent.llm.tools.agents import build_request
from troupe_runtime.agent.llm.types import (
    ChatRequest,
    Completion,
    DeltaSink,
    Message,
    ModelRejected,
    ModelUnavailable,
    RateLimited,
    ToolCall,
    ToolResult,
    ToolSpec,
)
from troupe_runtime.agent.processing import budget_outcome, describe
from troupe_runtime.agent.ratelimit import credit, gcra
from troupe_runtime.agent.schemas import ContractChecker
from troupe_runtime.agent.settle import DeadLetter, ModelFailed, OverBudget, Policy, decide
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.budget import Amount, BudgetExceeded, BudgetUnavailable, SpendContext
from troupe_runtime.contract.dead_letters import DeadLetterReason
from troupe_runtime.contract.envelope import WORKFLOW_ATTRIBUTE, CloudEvent, workflow_of
from troupe_runtime.contract.grammar import DNS_LABEL_PATTERN
from troupe_runtime.contract.llm import LlmRuntime
from troupe_runtime.contract.llm_policy import LlmPolicy, TokenRateLimit
from troupe_runtime.contract.model_provider import Pricing
from troupe_runtime.contract.usage import Usage

ASK = [{"role": "user", "content": "Summarise the findings."}]
PRICING = {"inputPerMillion": 2.0, "outputPerMillion": 10.0}
PRICE = Pricing.model_validate(PRICING)
SPEND = SpendContext(agent="writer", workflow="research", run="run-1", hold_id="h")


def event_with(**attributes: Any) -> CloudEvent:
    return CloudEvent.model_validate({"id": "e", "source": "/s", "type": "t", **attributes})


def refused() -> BudgetExceeded:
    return BudgetExceeded("team", "tokens", 990, 0, 1030, 1000)


# -- a fake guard ---------------------------------------------------------------------------


@dataclass
class FakeHeld:
    log: list[tuple[str, str, Amount | None]]
    hold_id: str

    async def commit(self, actual: Amount) -> None:
        self.log.append(("commit", self.hold_id, actual))

    async def release(self) -> None:
        self.log.append(("release", self.hold_id, None))


@dataclass
class FakeBudgets:
    """A guard whose budgets apply (or not) and which grants, refuses or fails holds."""

    applying: bool = True
    failure: Exception | None = None
    holds: list[tuple[SpendContext, Amount]] = field(default_factory=list)
    log: list[tuple[str, str, Amount | None]] = field(default_factory=list)

    def applies(self, spend: SpendContext) -> bool:
        return self.applying

    async def reserve(self, spend: SpendContext, amount: Amount) -> Held:
        if self.failure is not None:
            raise self.failure
        self.holds.append((spend, amount))
        return FakeHeld(self.log, spend.hold_id)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def backup() -> Iterator[ScriptedLlm]:
    with ScriptedLlm() as server:
        yield server


def priced(*chain: tuple[str, ScriptedLlm], **limits: int) -> LlmRuntime:
    """Providers named as given, one model "m" each, priced; ``limits`` on every one."""
    extra: dict[str, Any] = {"limits": limits} if limits else {}
    return runtime(
        [(name, "m") for name, _ in chain],
        [
            provider(name, server.base_url, ("m",), model_fields={"pricing": PRICING}, **extra)
            for name, server in chain
        ],
    )


def ask(max_tokens: int | None = None, spend: SpendContext | None = SPEND) -> ChatRequest:
    return ChatRequest(messages=ASK, max_tokens=max_tokens, spend=spend)


# -- the router's holds ---------------------------------------------------------------------


async def test_a_budgeted_call_holds_its_estimate_and_commits_what_it_used(
    scripted_llm: ScriptedLlm,
) -> None:
    budgets = FakeBudgets()
    router = ModelRouter(priced(("main", scripted_llm)), {}, budgets=budgets)
    scripted_llm.script(Text("done", usage=(11, 7)))
    try:
        completion = await router.complete(ask(), None)
    finally:
        await router.aclose()
    prompt = estimate_tokens(ASK)
    ((spend, amount),) = budgets.holds
    assert spend == SpendContext("writer", "research", "run-1", "h:0")
    assert amount == Amount(
        tokens=prompt + DEFAULT_BUDGET_MAX_TOKENS,
        cost_usd=PRICE.cost(prompt, DEFAULT_BUDGET_MAX_TOKENS),
    )
    # maxTokens was unset: the call is sent with the hold's output reservation.
    assert scripted_llm.completions[0].body["max_tokens"] == DEFAULT_BUDGET_MAX_TOKENS
    assert budgets.log == [
        ("commit", "h:0", Amount(tokens=18, cost_usd=completion.usage.cost_usd)),
    ]
    assert completion.usage.cost_usd == pytest.approx(PRICE.cost(11, 7))


async def test_the_declared_max_tokens_and_the_loops_overhead_make_the_hold(
    scripted_llm: ScriptedLlm,
) -> None:
    budgets = FakeBudgets()
    router = ModelRouter(priced(("main", scripted_llm)), {}, budgets=budgets)
    scripted_llm.script(Text("done"))
    request = ChatRequest(messages=ASK, max_tokens=200, spend=SPEND, prompt_overhead=40)
    try:
        await router.complete(request, None)
    finally:
        await router.aclose()
    prompt = estimate_tokens(ASK) + 40
    assert budgets.holds[0][1] == Amount(tokens=prompt + 200, cost_usd=PRICE.cost(prompt, 200))
    assert scripted_llm.completions[0].body["max_tokens"] == 200


@pytest.mark.parametrize(
    ("budgets", "spend"),
    [(FakeBudgets(applying=False), SPEND), (FakeBudgets(), None), (None, SPEND)],
    ids=["no-budget-applies", "no-spend-context", "no-guard"],
)
async def test_without_an_applicable_budget_nothing_is_held_and_max_tokens_stays_unset(
    scripted_llm: ScriptedLlm, budgets: FakeBudgets | None, spend: SpendContext | None
) -> None:
    router = ModelRouter(priced(("main", scripted_llm)), {}, budgets=budgets)
    scripted_llm.script(Text("done"))
    try:
        await router.complete(ask(spend=spend), None)
    finally:
        await router.aclose()
    assert "max_tokens" not in scripted_llm.completions[0].body
    assert budgets is None or (budgets.holds, budgets.log) == ([], [])


async def test_a_refusal_ends_the_walk_and_no_model_is_called(
    scripted_llm: ScriptedLlm, backup: ScriptedLlm
) -> None:
    budgets = FakeBudgets(failure=refused())
    router = ModelRouter(priced(("main", scripted_llm), ("backup", backup)), {}, budgets=budgets)
    try:
        with pytest.raises(BudgetExceeded, match="hard limit 1000"):
            await router.complete(ask(), None)
        # The breaker is not blamed: the next call (budget or not) is let through.
        assert router.breaker("main").allow()
    finally:
        await router.aclose()
    assert scripted_llm.completions == backup.completions == []


async def test_an_unreadable_ledger_makes_no_call(scripted_llm: ScriptedLlm) -> None:
    budgets = FakeBudgets(failure=BudgetUnavailable("the ledger could not be advanced"))
    router = ModelRouter(priced(("main", scripted_llm)), {}, budgets=budgets)
    try:
        with pytest.raises(BudgetUnavailable):
            await router.complete(ask(), None)
    finally:
        await router.aclose()
    assert scripted_llm.completions == []


async def test_each_model_tried_holds_anew_and_a_failed_one_is_released(
    scripted_llm: ScriptedLlm, backup: ScriptedLlm
) -> None:
    budgets = FakeBudgets()
    router = ModelRouter(priced(("main", scripted_llm), ("backup", backup)), {}, budgets=budgets)
    scripted_llm.script(HttpError(503, "overloaded"))
    backup.script(Text("from the backup", usage=(20, 5)))
    try:
        completion = await router.complete(ask(), None)
    finally:
        await router.aclose()
    assert [spend.hold_id for spend, _ in budgets.holds] == ["h:0", "h:1"]
    assert budgets.log == [
        ("release", "h:0", None),
        ("commit", "h:1", Amount(tokens=25, cost_usd=completion.usage.cost_usd)),
    ]
    assert [f.reason for f in completion.fallbacks] == ["unavailable"]


@pytest.mark.parametrize(
    ("reply", "raised"),
    [
        (HttpError(429, headers={"Retry-After": "3"}), RateLimited),
        (HttpError(400, "maximum context length"), ModelRejected),
        (Text("too late", delay=5), ModelUnavailable),
    ],
    ids=["429", "rejected", "timeout"],
)
async def test_a_call_that_was_not_answered_is_released(
    scripted_llm: ScriptedLlm, reply: HttpError | Text, raised: type[Exception]
) -> None:
    budgets = FakeBudgets()
    router = ModelRouter(priced(("main", scripted_llm)), {}, budgets=budgets, call_timeout=0.3)
    scripted_llm.script(reply)
    try:
        with pytest.raises(raised):
            await router.complete(ask(), None)
    finally:
        await router.aclose()
    assert budgets.log == [("release", "h:0", None)]


# -- the agent's own tokens per minute, the provider's rpm and tpm --------------------------


def cost_of(max_tokens: int) -> int:
    return estimate_tokens(ASK) + max_tokens


async def test_the_agents_own_tpm_throttles_before_any_provider_is_asked(
    scripted_llm: ScriptedLlm,
) -> None:
    clock = FakeClock()
    # 600 a minute: bursts of 100, then 10 a second; the provider's rpm: bursts of 2.
    own = agent_token_limiter(TokenRateLimit(tokens_per_minute=600), "writer", None, clock)
    router = ModelRouter(
        priced(("main", scripted_llm), requestsPerMinute=12),
        {},
        clock=clock,
        max_limit_wait=0.1,
        token_limit=own,
    )
    big = 90 - estimate_tokens(ASK)
    scripted_llm.script(Text("one", usage=(estimate_tokens(ASK), big)), Text("two"))
    try:
        await router.complete(ask(big, spend=None), None)
        with pytest.raises(RateLimited, match="own token rate limit") as caught:
            await router.complete(ask(big, spend=None), None)
        assert caught.value.retry_after == pytest.approx(8.0)
        assert len(scripted_llm.completions) == 1
        # The throttled call took no request from the provider: a small one still passes.
        assert (await router.complete(ask(1, spend=None), None)).message["content"] == "two"
    finally:
        await router.aclose()


async def test_the_agents_tokens_are_given_back_when_no_model_answered(
    scripted_llm: ScriptedLlm,
) -> None:
    clock = FakeClock()
    own = agent_token_limiter(TokenRateLimit(tokens_per_minute=600), "writer", None, clock)
    router = ModelRouter(
        priced(("main", scripted_llm)), {}, clock=clock, max_limit_wait=0.1, token_limit=own
    )
    big = 90 - estimate_tokens(ASK)
    scripted_llm.script(HttpError(503), Text("answered"))
    try:
        with pytest.raises(ModelUnavailable):
            await router.complete(ask(big, spend=None), None)
        # Nothing was spent: the same 90 tokens pass again at once.
        assert (await router.complete(ask(big, spend=None), None)).message["content"] == "answered"
    finally:
        await router.aclose()


async def test_what_an_answer_used_past_the_agents_estimate_is_charged(
    scripted_llm: ScriptedLlm,
) -> None:
    clock = FakeClock()
    own = agent_token_limiter(TokenRateLimit(tokens_per_minute=600), "writer", None, clock)
    router = ModelRouter(
        priced(("main", scripted_llm)), {}, clock=clock, max_limit_wait=0.1, token_limit=own
    )
    # Estimated at a few tokens (no max_tokens), it used 100: the bucket is empty after it.
    scripted_llm.script(Text("long", usage=(10, 90)), Text("never"))
    try:
        await router.complete(ask(spend=None), None)
        with pytest.raises(RateLimited):
            await router.complete(ask(spend=None), None)
    finally:
        await router.aclose()
    assert len(scripted_llm.completions) == 1


async def test_the_request_token_is_given_back_when_tpm_then_throttles(
    scripted_llm: ScriptedLlm,
) -> None:
    clock = FakeClock()
    # rpm: bursts of 2; tpm: bursts of 100. The second call's 90 tokens do not fit.
    router = ModelRouter(
        priced(("main", scripted_llm), requestsPerMinute=12, tokensPerMinute=600),
        {},
        clock=clock,
        max_limit_wait=0.1,
    )
    big = 90 - estimate_tokens(ASK)
    scripted_llm.script(Text("one", usage=(estimate_tokens(ASK), big)), Text("small"))
    try:
        await router.complete(ask(big, spend=None), None)
        with pytest.raises(RateLimited):
            await router.complete(ask(big, spend=None), None)
        # Without the refund the throttled call had spent rpm's second token: this one,
        # which fits in tpm, would be throttled by rpm.
        assert (await router.complete(ask(1, spend=None), None)).message["content"] == "small"
    finally:
        await router.aclose()
    assert len(scripted_llm.completions) == 2


def test_a_replica_or_missing_bucket_keeps_the_agents_limit_in_memory() -> None:
    assert agent_token_limiter(None, "a", None) is None
    local = agent_token_limiter(TokenRateLimit(tokens_per_minute=60, scope="global"), "a", None)
    assert type(local).__name__ == "LocalLimiter"


RATE = st.floats(min_value=0.01, max_value=1e6)
BURST = st.integers(min_value=1, max_value=10_000)
TIME = st.floats(min_value=0, max_value=1e6)


@given(TIME, TIME, RATE, BURST, st.floats(min_value=0, max_value=1e5))
def test_a_refund_undoes_what_an_acquire_took(
    tat: float, now: float, rate: float, burst: int, cost: float
) -> None:
    tat = min(tat, now + burst / rate)  # a TAT a replica could have written
    decision = gcra(tat, now, rate, burst, cost)
    if not decision.allowed:
        return
    after = credit(decision.tat, now, rate, burst, cost)
    slack = 1e-9 * max(1.0, abs(now), abs(tat))
    assert after == pytest.approx(max(tat, now), abs=slack + 1e-6 / rate)
    assert after >= now


# -- the loop -------------------------------------------------------------------------------


class MemoryJournal(Journal):
    """A journal that keeps nothing: these tests never resume."""

    def __init__(self) -> None:
        self.correlation_id = "llm-test"

    async def turn(
        self, turn: int, new: list[Message], completion: Completion, *, repair: bool
    ) -> None:
        return None

    async def fallbacks(self, turn: int, fallbacks: Any) -> None:
        return None

    async def tool_started(self, turn: int, call_id: str, name: str) -> None:
        return None

    async def tool_finished(
        self, turn: int, call_id: str, message: Message, offloaded: str | None
    ) -> None:
        return None

    async def deferred(self, index: int, delay: float, error: str) -> None:
        return None


class Caller:
    """Answers from a list: a completion, or an exception to raise."""

    def __init__(self, *steps: Completion | Exception) -> None:
        self._steps = list(steps)
        self.requests: list[ChatRequest] = []

    async def complete(self, request: ChatRequest, on_delta: DeltaSink | None) -> Completion:
        self.requests.append(request)
        step = self._steps.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


class LookupTools:
    async def specs(self) -> list[ToolSpec]:
        return [ToolSpec("lookup", "look up", {"type": "object", "properties": {}})]

    async def call(self, call: ToolCall, arguments: dict[str, Any]) -> ToolResult:
        return ToolResult("found it")

    async def aclose(self) -> None:
        return None


def tool_turn(content: str, usage: Usage) -> Completion:
    message = {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
        ],
    }
    return Completion(message, "tool_calls", usage, "main", "m")


async def _nothing() -> None:
    return None


def conversation(
    caller: Caller,
    *,
    on_budget_exceeded: str = "dead-letter",
    schema: dict[str, Any] | None = None,
) -> Conversation:
    policy = LlmPolicy.model_validate(
        {"model": {"provider": "main", "model": "m"}, "onBudgetExceeded": on_budget_exceeded}
    )
    config = RuntimeConfig.model_validate({"agent": "writer", "namespace": "ns"})
    event = CloudEvent(id="e1", source="/t", type="t", correlationid="run-1")
    return Conversation(
        LoopSettings("writer", policy, schema, 8192),
        caller=caller,
        toolbox=LookupTools(),
        journal=MemoryJournal(),
        offloader=Offloader(Client().jetstream(), "ns", 8192),  # small results: no I/O
        stream=TokenStream(None, "unused"),
        checker=ContractChecker(config.contract),
        on_completion=lambda completion, total: None,
        progress=_nothing,
        wait_budget=lambda: 0.0,
        spend=spending("writer", event, 1),
    )


USAGE = Usage(tokens_in=30, tokens_out=12, cost_usd=0.001)


async def test_answer_mode_answers_with_what_the_loop_has() -> None:
    caller = Caller(tool_turn("Let me look that up.", USAGE), refused())
    answer = await conversation(caller, on_budget_exceeded="answer").run(ASK, ResumeState())
    assert answer.data == {
        "content": "Let me look that up.",
        "model": "m",
        "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42},
        "stopped": BUDGET_STOP,
    }
    assert answer.usage == USAGE
    assert answer.turns == 1


async def test_answer_mode_refused_on_the_first_turn_answers_empty() -> None:
    answer = await conversation(Caller(refused()), on_budget_exceeded="answer").run(
        ASK, ResumeState()
    )
    assert answer.data["content"] == ""
    assert answer.data["stopped"] == BUDGET_STOP
    assert answer.data["usage"]["total_tokens"] == 0


@pytest.mark.parametrize(
    ("mode", "schema"),
    [("dead-letter", None), ("answer", {"type": "object"})],
    ids=["dead-letter", "answer-with-an-output-schema"],
)
async def test_otherwise_the_refusal_is_raised(mode: str, schema: dict[str, Any] | None) -> None:
    caller = Caller(tool_turn("", USAGE), refused())
    with pytest.raises(BudgetExceeded):
        await conversation(caller, on_budget_exceeded=mode, schema=schema).run(ASK, ResumeState())


async def test_each_turn_carries_its_own_spend_context_and_the_learnt_overhead() -> None:
    final = Completion({"role": "assistant", "content": "done"}, "stop", USAGE, "main", "m")
    caller = Caller(tool_turn("", Usage(tokens_in=estimate_tokens(ASK) + 25, tokens_out=3)), final)
    await conversation(caller).run(ASK, ResumeState())
    first, second = caller.requests
    assert first.spend == SpendContext("writer", None, "run-1", hold_id("writer", "e1", 1, 0))
    assert second.spend is not None
    assert second.spend.hold_id == hold_id("writer", "e1", 1, 1)
    assert (first.prompt_overhead, second.prompt_overhead) == (0, 25)


# -- SpendContext and the Workflow attribute ------------------------------------------------


@given(
    st.text(min_size=1, max_size=20),
    st.text(min_size=1, max_size=20),
    st.integers(min_value=1, max_value=1000),
    st.integers(min_value=0, max_value=100),
)
def test_hold_ids_are_deterministic_and_differ_per_event_delivery_and_turn(
    agent: str, event_id: str, delivery: int, turn: int
) -> None:
    one = hold_id(agent, event_id, delivery, turn)
    assert one == hold_id(agent, event_id, delivery, turn)
    assert re.fullmatch(r"[0-9a-f]{32}", one)
    others = {
        hold_id(agent, event_id + "x", delivery, turn),
        hold_id(agent, event_id, delivery + 1, turn),
        hold_id(agent, event_id, delivery, turn + 1),
        hold_id(agent + "x", event_id, delivery, turn),
    }
    assert one not in others
    assert len(others) == 4


def test_the_spend_context_names_the_workflow_and_the_run() -> None:
    event = event_with(correlationid="r", **{WORKFLOW_ATTRIBUTE: "research"})
    assert spending("a", event, 2)(3) == SpendContext("a", "research", "r", hold_id("a", "e", 2, 3))
    alone = CloudEvent(id="e", source="/s", type="t")
    assert spending("a", alone, 1)(0).run is None  # in no run: Run windows do not count it


@given(st.text(max_size=80))
def test_only_a_workflow_name_is_taken_from_the_event(value: str) -> None:
    try:
        event = event_with(**{WORKFLOW_ATTRIBUTE: value})
    except ValueError:
        return  # control characters: the envelope refuses the event itself
    found = workflow_of(event)
    is_label = re.fullmatch(DNS_LABEL_PATTERN, value) is not None and len(value) <= 63
    assert found == (value if is_label else None)


@given(st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True))
def test_a_workflow_name_is_carried_to_an_agent_called_as_a_tool(name: str) -> None:
    config = RuntimeConfig.model_validate({"agent": "writer", "namespace": "ns"})
    cause = event_with(**{WORKFLOW_ATTRIBUTE: name})
    request = build_request(config, cause, ToolCall("c", "search", "{}"), {})
    assert (request.model_extra or {})[WORKFLOW_ATTRIBUTE] == name


def test_junk_in_place_of_a_workflow_is_not_carried() -> None:
    config = RuntimeConfig.model_validate({"agent": "writer", "namespace": "ns"})
    for junk in ("Not A Label", "a.b", "x" * 64, 7):
        cause = event_with(**{WORKFLOW_ATTRIBUTE: junk})
        request = build_request(config, cause, ToolCall("c", "search", "{}"), {})
        assert WORKFLOW_ATTRIBUTE not in (request.model_extra or {})


# -- settling a refusal ---------------------------------------------------------------------


@given(st.integers(min_value=1, max_value=50), st.integers(min_value=1, max_value=50))
def test_a_refusal_is_dead_lettered_at_once_whatever_the_attempt(
    attempt: int, max_attempts: int
) -> None:
    error = refused()
    outcome = budget_outcome(error, attempt)
    assert outcome == OverBudget(str(error))
    policy = Policy(max_attempts=max_attempts, backoff=(1.0,))
    assert decide(outcome, policy) == DeadLetter(DeadLetterReason.BUDGET_EXCEEDED, str(error))


def test_an_unavailable_ledger_is_retried_like_an_unavailable_model() -> None:
    error = BudgetUnavailable("ledger.team.d20261202: 10 lost races")
    assert budget_outcome(error, 2) == ModelFailed(describe(error), 2)
    settlement = decide(budget_outcome(error, 1), Policy(max_attempts=3, backoff=(1.0,)))
    assert type(settlement).__name__ == "Nak"
