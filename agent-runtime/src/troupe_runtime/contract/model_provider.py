"""A ModelProvider: an OpenAI-compatible endpoint, the models it serves, their prices, its limits.

The ModelProvider CRD's spec is built from ``ModelProviderSpec``; the operator writes
it, with the API key turned into an environment variable name, into the runtime config
of every Agent that names the provider (``troupe_runtime.contract.llm.ResolvedProvider``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from troupe_runtime.contract import grammar
from troupe_runtime.contract.policies import WireModel

HEADER_NAME_PATTERN = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$"
"""An HTTP header name (RFC 9110 token)."""
HEADER_VALUE_PATTERN = r"^[\x20-\x7e]*$"
"""A header value of printable ASCII: no CR or LF, so no header can be smuggled."""
RESERVED_HEADERS = ("authorization", "content-type", "content-length", "host")
"""Headers Troupe sets itself; a provider's ``headers`` may not name them."""
MODEL_NAME_PATTERN = r"^[\x21-\x7e]+$"
MODEL_NAME_MAX = 256


class SecretKeySelector(WireModel):
    """One key of a Secret in the provider's namespace."""

    name: str = Field(
        pattern=grammar.DNS_SUBDOMAIN_PATTERN,
        max_length=grammar.DNS_SUBDOMAIN_MAX,
        description="The Secret's name.",
    )
    key: str = Field(
        default="apiKey",
        pattern=grammar.CONFIG_KEY_PATTERN,
        max_length=253,
        description="The key holding the value; default apiKey.",
    )


class Pricing(WireModel):
    """What a model costs, in US dollars per million tokens."""

    input_per_million: float = Field(
        default=0.0, ge=0, le=1_000_000, description="Dollars per million input tokens; default 0."
    )
    output_per_million: float = Field(
        default=0.0, ge=0, le=1_000_000, description="Dollars per million output tokens; default 0."
    )

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        """Dollars for one completion."""
        return (tokens_in * self.input_per_million + tokens_out * self.output_per_million) / 1e6


class ServedModel(WireModel):
    """One model the provider serves."""

    name: str = Field(
        pattern=MODEL_NAME_PATTERN,
        max_length=MODEL_NAME_MAX,
        description="The model's name as the endpoint knows it (the request's model field).",
    )
    context_window: int = Field(
        default=8192,
        ge=256,
        le=100_000_000,
        description="Tokens the model reads and writes per call; the history sent is kept "
        "within it. Default 8192.",
    )
    pricing: Pricing = Field(default_factory=Pricing, description="Price per million tokens.")


class ProviderLimits(WireModel):
    """Limits the provider sets, kept by every replica together (NATS KV)."""

    requests_per_minute: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Completions per minute; unset: none."
    )
    tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000_000,
        description="Input plus output tokens per minute; unset: none.",
    )


HeaderName = Annotated[str, Field(pattern=HEADER_NAME_PATTERN, max_length=256)]
HeaderValue = Annotated[str, Field(pattern=HEADER_VALUE_PATTERN, max_length=4096)]


class ModelProviderSpec(WireModel):
    """An OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, Ollama, a gateway)."""

    base_url: str = Field(
        pattern=grammar.HTTP_URL_PATTERN,
        max_length=grammar.URL_MAX,
        description="The API's base URL, ending before /chat/completions, such as "
        "https://api.openai.com/v1 or http://model-server:8080/v1.",
    )
    api_key_secret: SecretKeySelector | None = Field(
        default=None,
        description="The Secret key holding the API key, sent as a Bearer token; unset: no key "
        "(a local server).",
    )
    headers: dict[HeaderName, HeaderValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Extra request headers, such as OpenAI-Organization; not for secrets.",
    )
    models: list[ServedModel] = Field(
        min_length=1,
        max_length=256,
        description="The models it serves; an Agent may name only these.",
    )
    limits: ProviderLimits = Field(
        default_factory=ProviderLimits, description="Requests and tokens per minute."
    )

    @model_validator(mode="after")
    def _checks(self) -> ModelProviderSpec:
        names = [model.name for model in self.models]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        reserved = [name for name in self.headers if name.lower() in RESERVED_HEADERS]
        if reserved:
            raise ValueError(f"headers may not set {', '.join(sorted(reserved))}")
        return self

    def model(self, name: str) -> ServedModel | None:
        return next((model for model in self.models if model.name == name), None)
