"""Builders for the model client's tests: providers and runtimes pointing at a scripted server."""

from __future__ import annotations

from typing import Any

from troupe_runtime.contract.llm import LlmRuntime, ResolvedProvider
from troupe_runtime.contract.llm_policy import LlmPolicy
from troupe_runtime.contract.model_provider import ModelProviderSpec


def provider(
    name: str,
    base_url: str,
    models: tuple[str, ...] = ("m",),
    api_key_env: str | None = None,
    **spec: Any,
) -> ResolvedProvider:
    """A provider serving ``models`` at ``base_url``; ``spec`` adds camelCase spec fields."""
    served = [{"name": model, **spec.pop("model_fields", {})} for model in models]
    return ResolvedProvider(
        name=name,
        spec=ModelProviderSpec.model_validate({"baseUrl": base_url, "models": served, **spec}),
        api_key_env=api_key_env,
    )


def runtime(chain: list[tuple[str, str]], providers: list[ResolvedProvider]) -> LlmRuntime:
    """An LLM runtime asking ``chain`` ((provider, model) pairs) in order."""
    first, *rest = chain
    policy = LlmPolicy.model_validate(
        {
            "model": {"provider": first[0], "model": first[1]},
            "fallbacks": [{"provider": p, "model": m} for p, m in rest],
        }
    )
    return LlmRuntime(policy=policy, providers=providers)
