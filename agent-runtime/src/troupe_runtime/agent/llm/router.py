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
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Literal

from nats.js.kv import KeyValue

from troupe_runtime.agent.llm.breaker import CircuitBreaker
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
from troupe_runtime.contract.llm import LlmRuntime, ResolvedProvider
from troupe_runtime.contract.naming import provider_limit_key
from troupe_runtime.contract.policies import RateLimit

logger = logging.getLogger(__name__)

DEFAULT_MAX_LIMIT_WAIT_SECONDS = 10.0
"""How long a call waits for its provider's rpm/tpm budget before falling back."""
BURST_SECONDS = 10.0
"""A provider's per-minute budget may be spent this many seconds' worth at once."""
MAX_ERROR_CHARS = 1000


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
    ) -> None:
        self.call_timeout = call_timeout
        self.max_limit_wait = max_limit_wait
        providers: dict[str, _Provider] = {}
        self._routes: list[_Route] = []
        for ref in runtime.policy.chain():
            provider = providers.get(ref.provider)
            if provider is None:
                resolved = runtime.provider(ref.provider)
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
            self._routes.append(_Route(provider, ref.provider, ref.model))
        self._providers = list(providers.values())

    def breaker(self, provider: str) -> CircuitBreaker:
        """The circuit breaker of ``provider`` (for metrics and tests)."""
        return next(r.provider.breaker for r in self._routes if r.name == provider)

    async def complete(self, request: ChatRequest, on_delta: DeltaSink | None) -> Completion:
        """The first answer the chain gives; see the module's docstring for the walk."""
        fallbacks: list[Fallback] = []
        waits: list[float | None] = []
        only_rate_limits = True
        for route in self._routes:
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
                charged = await self._admit(provider, request)
                completion = await provider.client.complete(
                    request, route.model, on_delta, self.call_timeout
                )
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
            except BaseException:
                provider.breaker.release()
                raise
            else:
                provider.breaker.success()
                if provider.tokens is not None and completion.usage.tokens > charged:
                    await _charge(provider.tokens, completion.usage.tokens - charged, route.name)
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

    async def aclose(self) -> None:
        for provider in self._providers:
            await provider.client.aclose()

    async def _admit(self, provider: _Provider, request: ChatRequest) -> int:
        """Wait (at most ``max_limit_wait``) for room in the provider's rpm and tpm budgets;
        the tokens taken."""
        if provider.requests is not None:
            await provider.requests.acquire(1.0, self.max_limit_wait)
        if provider.tokens is None:
            return 0
        cost = estimate_tokens(request.messages) + (request.max_tokens or 0)
        await provider.tokens.acquire(float(cost), self.max_limit_wait)
        return cost


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


async def _charge(tokens: Limiter, cost: int, provider: str) -> None:
    """Count tokens a completion used beyond its estimate; an answer is never lost to it."""
    try:
        await tokens.charge(float(cost))
    except Exception:  # the KV bucket's trouble: the budget is a little generous this once
        logger.warning("could not charge %d tokens to provider %s's budget", cost, provider)


def _ignore() -> None:
    """Lost compare-and-set races on a provider key are retried; nothing to count."""
