"""The ``llm`` handler's contract: the legacy Secret-based single call, and the LLM agent.

Legacy (no ``spec.llm``): the environment the operator gives the handler from the Secret the
Agent names.

Each variable is filled from one key of that Secret; the model key is optional,
since ``handler.model`` in the Agent wins over it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from troupe_runtime.contract.llm_policy import LlmPolicy
from troupe_runtime.contract.model_provider import ModelProviderSpec, ServedModel
from troupe_runtime.contract.policies import WireModel

BASE_URL_ENV = "TROUPE_LLM_BASE_URL"
API_KEY_ENV = "TROUPE_LLM_API_KEY"
MODEL_ENV = "TROUPE_LLM_MODEL"

# (environment variable, Secret key, optional)
SECRET_KEYS: tuple[tuple[str, str, bool], ...] = (
    (BASE_URL_ENV, "baseUrl", False),
    (API_KEY_ENV, "apiKey", False),
    (MODEL_ENV, "model", True),
)


# The LLM agent (``Agent.spec.llm``), as the operator resolves it for the runtime.

PROVIDER_KEY_ENV_PREFIX = "TROUPE_PROVIDER_KEY_"
"""``TROUPE_PROVIDER_KEY_<PROVIDER>``: a provider's API key, from its Secret (env, never the
ConfigMap)."""
SYSTEM_PROMPT_DIR = Path("/etc/troupe/prompt")
"""Where the operator mounts a system prompt's ConfigMap key (file name: the key)."""


def provider_key_env(provider: str) -> str:
    """The environment variable holding ``provider``'s API key."""
    return PROVIDER_KEY_ENV_PREFIX + provider.upper().replace("-", "_")


A2A_TOKEN_ENV_PREFIX = "TROUPE_A2A_TOKEN_"
"""``TROUPE_A2A_TOKEN_<NAME>``: a remote A2A agent's bearer token, from its Secret."""


def a2a_token_env(name: str) -> str:
    """The environment variable holding the bearer token of ``spec.llm.tools.a2a`` ``name``
    (a DNS label, so distinct names give distinct variables)."""
    return A2A_TOKEN_ENV_PREFIX + name.upper().replace("-", "_")


class ResolvedProvider(WireModel):
    """A ModelProvider as one Agent's runtime sees it: its spec, its key's env variable."""

    name: str
    spec: ModelProviderSpec
    api_key_env: str | None = Field(
        default=None, description="The env variable with the key; None: send no key."
    )

    def model(self, name: str) -> ServedModel | None:
        return self.spec.model(name)


class ResolvedTool(WireModel):
    """A tool endpoint the operator resolved: an MCP server's URL, a callee's inbox."""

    name: str
    url: str | None = None
    """MCP: the endpoint (a Service reference made a URL)."""
    inbox_subject: str | None = None
    """Agents: the callee's inbox subject (priority 0)."""
    input_schema: dict[str, object] | None = None
    """Agents: the callee's contract input schema, the tool's parameters."""
    description: str | None = None
    token_env: str | None = None
    """A2A: the env variable holding the bearer token (from a Secret); None: none sent."""


class LlmRuntime(WireModel):
    """Everything the LLM loop needs: the declared policy, resolved."""

    policy: LlmPolicy
    providers: list[ResolvedProvider] = Field(default_factory=list)
    """Every provider the chain names, each once."""
    system_prompt_file: Path | None = None
    """Set when the prompt comes from a ConfigMap key: the mounted file to read."""
    mcp: list[ResolvedTool] = Field(default_factory=list)
    """One per ``policy.tools.mcp`` entry, same order, same names."""
    agents: list[ResolvedTool] = Field(default_factory=list)
    """One per ``policy.tools.agents`` entry, same order; name is the tool's name."""
    a2a: list[ResolvedTool] = Field(default_factory=list, alias="a2a")
    """One per ``policy.tools.a2a`` entry, same order, same names: its URL and token env."""

    def provider(self, name: str) -> ResolvedProvider | None:
        return next((p for p in self.providers if p.name == name), None)


MAX_DEFERRALS = 20
"""429 deferrals a message may take (each a redelivery that burns no attempt): the inbox
consumers of an llm agent allow ``maxAttempts + 1 + MAX_DEFERRALS`` deliveries."""
