"""The chain of models an LLM agent may ask: fallback, circuit breakers, provider limits.

``ModelRouter.complete`` walks ``policy.chain()`` in order. A model is passed over, with
a ``Fallback`` recorded, when its provider's circuit is open, when its provider's
requests- or tokens-per-minute budget has no room within ``max_limit_wait``, or when it
answers 429, 5xx or not in time; a ``ModelRejected`` (400, 401, context length…) ends
the walk at once, since the same request fails on the next model too. When every model
failed: ``RateLimited`` (the smallest Retry-After) if each failure was a rate limit, else
``ModelUnavailable``.

Provider limits are GCRA buckets (``agent/ratelimit.py``) under
``naming.provider_limit_key``: in the namespace's rate-limit KV bucket when a handle is
given (every replica of every agent using the provider shares them), else in memory. A
minute's budget may be spent in bursts of ten seconds' worth. A call takes its
estimated input tokens plus ``max_tokens`` before it goes out (what providers count
against a limit before they answer); what its usage shows beyond that is charged after.
The requests-per-minute token is given back when the tokens-per-minute budget then has no
room (the call was not made).

The Agent's own ``spec.llm.rateLimit`` (tokens per minute, per replica or shared under
``naming.agent_token_limit_key``) is taken once per call, before any provider's limits,
and given back when no model answered; it has no fallback (it is the same for every
model), so any wait is ``RateLimited`` with that wait, for the loop to wait out or defer.

Budgets (``state.budgets``): when one applies to the request's ``spend``, each model tried
first takes a hold (the same token estimate, at that model's price) on every applicable
budget's ledger, committed with the actual usage after the answer and released on any
failure (429, 5xx, timeout: nothing is counted as spent). A request without ``max_tokens``
is sent with ``DEFAULT_BUDGET_MAX_TOKENS`` then, so no answer outgrows its hold.
``BudgetExceeded`` ends the walk (every model counts against the same budgets; a cheaper
model that would fit a cost limit is not looked for); ``BudgetUnavailable`` too: no call
is made unchecked.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal, Protocol

from nats.js.kv import KeyValue

from troupe_runtime.agent.chaos import Chaos
from troupe_runtime.agent.llm.breaker import CircuitBreaker
from troupe_runtime.agent.llm.chaos import model_fault
from troupe_runtime.agent.llm.client import (
    DEFAULT_CALL_TIMEOUT_SECONDS,
    ModelTimeout,
    ProviderClient,
)
from troupe_runtime.agent.llm.tokens import estimate_tokens
from troupe_runtime.agent.llm.types import (
    ChatRequest,
    Completion,
    DeltaSink,
    Fallback,
    ModelRejected,
    ModelUnavailable,
    RateLimited,
)
from troupe_runtime.agent.ratelimit import (
    GlobalLimiter,
    Limiter,
    LocalLimiter,
    RateLimitUnavailable,
    Throttled,
)
from troupe_runtime.contract.budget import Amount, SpendContext
from troupe_runtime.contract.llm import LlmRuntime, ResolvedProvider
from troupe_runtime.contract.llm_policy import TokenRateLimit
from troupe_runtime.contract.model_provider import Pricing
from troupe_runtime.contract.naming import agent_token_limit_key, provider_limit_key
from troupe_runtime.contract.policies import RateLimit

logger = logging.getLogger(__name__)

DEFAULT_MAX_LIMIT_WAIT_SECONDS = 10.0
"""How long a call waits for its provider's rpm/tpm budget before falling back."""
BURST_SECONDS = 10.0
"""A provider's per-minute budget may be spent this many seconds' worth at once."""
MAX_ERROR_CHARS = 1000
DEFAULT_BUDGET_MAX_TOKENS = 1024
"""``max_tokens`` sent when a budget applies and ``spec.llm.maxTokens`` is unset: the hold
must bound what the answer can spend."""


class Held(Protocol):
    """The holds one model call took (``state.budgets.Reservation``)."""

    async def commit(self, actual: Amount) -> None: ...

    async def release(self) -> None: ...


class Budgets(Protocol):
    """What the router asks of the namespace's budgets (``state.budgets``, or a fake)."""

    def applies(self, spend: SpendContext) -> bool:
        """Whether any budget counts this call (no I/O)."""
        ...

    async def reserve(self, spend: SpendContext, amount: Amount) -> Held:
        """Hold ``amount``; ``BudgetExceeded`` or ``BudgetUnavailable`` when it cannot."""
        ...


def per_minute_limit(per_minute: int, scope: Literal["replica", "global"]) -> RateLimit:
    """A GCRA bucket for ``per_minute`` units: that rate, bursts of ten seconds' worth."""
    rate = per_minute / 60.0
    return RateLimit(rate=rate, burst=max(1, math.ceil(rate * BURST_SECONDS)), scope=scope)


@dataclasses.dataclass
class _Provider:
    client: ProviderClient
    breaker: CircuitBreaker
    requests: Limiter | None
    tokens: Limiter | None


@dataclasses.dataclass(frozen=True)
class _Route:
    provider: _Provider
    name: str
    model: str
    pricing: Pricing | None

    def cost(self, prompt: int, completion: int) -> float:
        """Dollars a call of ``prompt`` and ``completion`` tokens costs here (no pricing: 0)."""
        return self.pricing.cost(prompt, completion) if self.pricing is not None else 0.0


class ModelRouter:
    """A ``ModelCaller`` over the agent's chain of models; one client per provider."""

    def __init__(
        self,
        runtime: LlmRuntime,
        env: Mapping[str, str],
        kv: KeyValue | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        call_timeout: float = DEFAULT_CALL_TIMEOUT_SECONDS,
        max_limit_wait: float = DEFAULT_MAX_LIMIT_WAIT_SECONDS,
        breaker_threshold: int = 5,
        breaker_reset_after: float = 30.0,
        budgets: Budgets | None = None,
        token_limit: Limiter | None = None,
        chaos: Chaos | None = None,
    ) -> None:
        self.call_timeout = call_timeout
        self._chaos = chaos
        """A ChaosExperiment's model faults, injected per model tried (``llm.chaos``)."""
        self.max_limit_wait = max_limit_wait
        self._budgets = budgets
        self._token_limit = token_limit
        """The Agent's own tokens per minute (``agent_token_limiter``), or None."""
        providers: dict[str, _Provider] = {}
        self._routes: list[_Route] = []
        for ref in runtime.policy.chain():
            provider = providers.get(ref.provider)
            resolved = runtime.provider(ref.provider)
            if provider is None:
                if resolved is None:
                    raise ValueError(
                        f"spec.llm names the ModelProvider {ref.provider!r}, which the runtime "
                        "config does not resolve (the operator writes every provider the chain "
                        "names)"
                    )
                breaker = CircuitBreaker(breaker_threshold, breaker_reset_after, clock)
                requests, tokens = _limiters(resolved, kv, clock)
                provider = _Provider(ProviderClient(resolved, env), breaker, requests, tokens)
                providers[ref.provider] = provider
            model = resolved.model(ref.model) if resolved is not None else None
            pricing = model.pricing if model is not None else None
            self._routes.append(_Route(provider, ref.provider, ref.model, pricing))
        self._providers = list(providers.values())

    def breaker(self, provider: str) -> CircuitBreaker:
        """The circuit breaker of ``provider`` (for metrics and tests)."""
        return next(r.provider.breaker for r in self._routes if r.name == provider)

    async def complete(self, request: ChatRequest, on_delta: DeltaSink | None) -> Completion:
        """The first answer the chain gives; see the module's docstring for the walk."""
        spend = request.spend
        if spend is not None and (self._budgets is None or not self._budgets.applies(spend)):
            spend = None
        if spend is not None and request.max_tokens is None:
            request = dataclasses.replace(request, max_tokens=DEFAULT_BUDGET_MAX_TOKENS)
        prompt = estimate_tokens(request.messages) + request.prompt_overhead
        tokens = prompt + (request.max_tokens or 0)
        await self._own_tokens(tokens)
        try:
            completion = await self._walk(request, on_delta, spend, prompt, tokens)
        except BaseException:
            if self._token_limit is not None:  # no model answered: nothing was spent
                await _quietly(self._token_limit.refund(float(tokens)), "refund the agent's tokens")
            raise
        if self._token_limit is not None and completion.usage.tokens > tokens:
            over = completion.usage.tokens - tokens
            await _charge(self._token_limit, over, "the agent's own token rate limit")
        return completion

    async def _own_tokens(self, tokens: int) -> None:
        """Take ``tokens`` from the Agent's own rate limit, or raise ``RateLimited`` with the
        wait at once: the loop waits in place (reporting progress, which a wait in here would
        not) or defers the message; no model would have room sooner."""
        if self._token_limit is None:
            return
        try:
            await self._token_limit.acquire(float(tokens), 0.0)
        except Throttled as error:
            raise RateLimited(
                f"the agent's own token rate limit (spec.llm.rateLimit): {error}", error.wait
            ) from None
        except RateLimitUnavailable as error:
            raise RateLimited(f"the agent's own token rate limit: {error}", None) from None

    async def _walk(
        self,
        request: ChatRequest,
        on_delta: DeltaSink | None,
        spend: SpendContext | None,
        prompt: int,
        tokens: int,
    ) -> Completion:
        fallbacks: list[Fallback] = []
        waits: list[float | None] = []
        only_rate_limits = True
        for index, route in enumerate(self._routes):
            provider = route.provider
            if not provider.breaker.allow():
                fallbacks.append(
                    Fallback(
                        route.name,
                        route.model,
                        "circuit_open",
                        f"{route.name}: circuit open after {provider.breaker.failures} "
                        "consecutive failures",
                    )
                )
                only_rate_limits = False
                continue
            try:
                held = None
                if spend is not None:
                    amount = Amount(
                        tokens=tokens, cost_usd=route.cost(prompt, request.max_tokens or 0)
                    )
                    route_spend = dataclasses.replace(spend, hold_id=f"{spend.hold_id}:{index}")
                    assert self._budgets is not None
                    held = await self._budgets.reserve(route_spend, amount)
                completion = await self._call(route, request, on_delta, held, tokens)
            except (Throttled, RateLimitUnavailable) as error:
                provider.breaker.release()
                wait = error.wait if isinstance(error, Throttled) else None
                fallbacks.append(Fallback(route.name, route.model, "rate_limited", str(error)))
                waits.append(wait)
            except RateLimited as error:
                provider.breaker.success()
                fallbacks.append(Fallback(route.name, route.model, "rate_limited", str(error)))
                waits.append(error.retry_after)
            except ModelUnavailable as error:
                provider.breaker.failure()
                reason = "timeout" if isinstance(error, ModelTimeout) else "unavailable"
                fallbacks.append(Fallback(route.name, route.model, reason, str(error)))
                only_rate_limits = False
            except ModelRejected:
                provider.breaker.success()
                raise
            except BaseException:  # BudgetExceeded and BudgetUnavailable end the walk too
                provider.breaker.release()
                raise
            else:
                provider.breaker.success()
                if fallbacks:
                    return dataclasses.replace(completion, fallbacks=tuple(fallbacks))
                return completion
        summary = "; ".join(f"{f.reason}: {f.error}" for f in fallbacks)[:MAX_ERROR_CHARS]
        if only_rate_limits:
            known = [wait for wait in waits if wait is not None]
            raise RateLimited(
                f"every model is rate limited: {summary}", min(known) if known else None
            )
        raise ModelUnavailable(f"no model answered: {summary}")

    async def _call(
        self,
        route: _Route,
        request: ChatRequest,
        on_delta: DeltaSink | None,
        held: Held | None,
        tokens: int,
    ) -> Completion:
        """Ask one model within its provider's limits; the hold is committed with what the
        answer used, or released when there is no answer."""
        provider = route.provider
        try:
            charged = await self._admit(provider, tokens)
            time_limit = self.call_timeout
            if self._chaos is not None:
                where = f"provider {route.name}, model {route.model}"
                time_limit = await model_fault(self._chaos, where, time_limit)
            completion = await provider.client.complete(request, route.model, on_delta, time_limit)
        except BaseException:
            if held is not None:
                await _quietly(held.release(), "release a budget hold")
            raise
        usage = completion.usage
        if held is not None:
            actual = Amount(tokens=usage.tokens, cost_usd=usage.cost_usd)
            await _quietly(held.commit(actual), "commit a budget hold")
        if provider.tokens is not None and usage.tokens > charged:
            await _charge(
                provider.tokens, usage.tokens - charged, f"provider {route.name}'s budget"
            )
        return completion

    async def aclose(self) -> None:
        for provider in self._providers:
            await provider.client.aclose()

    async def _admit(self, provider: _Provider, tokens: int) -> int:
        """Wait (at most ``max_limit_wait``) for room in the provider's rpm and tpm budgets;
        the tokens taken. The request's token is given back when tpm has no room."""
        if provider.requests is not None:
            await provider.requests.acquire(1.0, self.max_limit_wait)
        if provider.tokens is None:
            return 0
        try:
            await provider.tokens.acquire(float(tokens), self.max_limit_wait)
        except BaseException:
            if provider.requests is not None:
                await _quietly(provider.requests.refund(1.0), "refund a request token")
            raise
        return tokens


def agent_token_limiter(
    limit: TokenRateLimit | None,
    agent: str,
    kv: KeyValue | None,
    clock: Callable[[], float] = time.monotonic,
) -> Limiter | None:
    """The Agent's own tokens-per-minute bucket: in memory for scope replica (or when no
    rate-limit bucket is at hand), else shared under ``agent_token_limit_key``."""
    if limit is None:
        return None
    if limit.scope == "global" and kv is not None:
        rate = per_minute_limit(limit.tokens_per_minute, "global")
        return GlobalLimiter(kv, agent_token_limit_key(agent), rate, on_conflict=_ignore)
    return LocalLimiter(per_minute_limit(limit.tokens_per_minute, "replica"), clock)


def _limiters(
    provider: ResolvedProvider, kv: KeyValue | None, clock: Callable[[], float]
) -> tuple[Limiter | None, Limiter | None]:
    limits = provider.spec.limits
    pairs = (("rpm", limits.requests_per_minute), ("tpm", limits.tokens_per_minute))
    built: list[Limiter | None] = []
    for kind, per_minute in pairs:
        if per_minute is None:
            built.append(None)
        elif kv is None:
            built.append(LocalLimiter(per_minute_limit(per_minute, "replica"), clock))
        else:
            key = provider_limit_key(provider.name, kind)
            limit = per_minute_limit(per_minute, "global")
            built.append(GlobalLimiter(kv, key, limit, on_conflict=_ignore))
    return built[0], built[1]


async def _charge(tokens: Limiter, cost: int, where: str) -> None:
    """Count tokens a completion used beyond its estimate; an answer is never lost to it."""
    try:
        await tokens.charge(float(cost))
    except Exception:  # the KV bucket's trouble: the budget is a little generous this once
        logger.warning("could not charge %d tokens to %s", cost, where)


async def _quietly(step: Awaitable[None], what: str) -> None:
    """Run a bookkeeping step whose failure must not cost the answer (or hide the error being
    raised): a hold not released or committed expires and is charged in full, a token not
    given back only makes a limit a little strict."""
    try:
        await step
    except Exception as error:
        logger.warning("could not %s: %s", what, error)


def _ignore() -> None:
    """Lost compare-and-set races on a provider key are retried; nothing to count."""
