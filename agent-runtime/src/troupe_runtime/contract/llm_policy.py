"""What an LLM agent declares (``Agent.spec.llm``): its models, prompt, sampling and tools.

The operator writes it, unchanged, into the runtime config next to the providers it
resolved (``troupe_runtime.contract.llm.LlmRuntime``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from pydantic import Field, model_validator

from troupe_runtime.contract import grammar
from troupe_runtime.contract.durations import Duration
from troupe_runtime.contract.model_provider import (
    MODEL_NAME_MAX,
    MODEL_NAME_PATTERN,
    SecretKeySelector,
)
from troupe_runtime.contract.policies import NAME_PATTERN, WireModel
from troupe_runtime.contract.sessions import SessionPolicy
from troupe_runtime.contract.tool_approvals import ToolApprovals

TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
"""What OpenAI accepts as a function name."""
ENTRYPOINT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"
A2A_URL_PATTERN = r"^https?://[\x21-\x2e\x30-\x3f\x41-\x7e]+(/[\x21-\x7e]*)?$"
"""An A2A agent's URL: http or https, no whitespace, and no user info (``user:pass@``) in
the authority: a credential goes in a Secret (``auth``), never into the config or status."""
SKILL_ID_MAX = 256
SkillId = Annotated[str, Field(min_length=1, max_length=SKILL_ID_MAX)]


class ModelRef(WireModel):
    """A model of a ModelProvider in the Agent's namespace."""

    provider: str = Field(
        pattern=NAME_PATTERN, max_length=grammar.DNS_LABEL_MAX, description="The ModelProvider."
    )
    model: str = Field(
        pattern=MODEL_NAME_PATTERN,
        max_length=MODEL_NAME_MAX,
        description="One of the provider's models.",
    )


class ConfigMapKeyRef(WireModel):
    """One key of a ConfigMap in the Agent's namespace."""

    name: str = Field(
        pattern=grammar.DNS_SUBDOMAIN_PATTERN,
        max_length=grammar.DNS_SUBDOMAIN_MAX,
        description="The ConfigMap's name.",
    )
    key: str = Field(pattern=grammar.CONFIG_KEY_PATTERN, max_length=253, description="The key.")


class SystemPrompt(WireModel):
    """The system prompt: inline or from a ConfigMap key, a template over the input.

    ``{{ input }}`` is the input data as JSON; ``{{ input.field }}`` one field of it
    (JMESPath); ``{{ agent }}``, ``{{ role }}`` name the agent. Nothing else is evaluated.
    """

    text: str | None = Field(default=None, max_length=262_144, description="The prompt itself.")
    config_map_key_ref: ConfigMapKeyRef | None = Field(
        default=None, description="A ConfigMap key holding the prompt (mounted, so edits apply)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> SystemPrompt:
        if (self.text is None) == (self.config_map_key_ref is None):
            raise ValueError("systemPrompt needs exactly one of text and configMapKeyRef")
        return self


class ServiceRef(WireModel):
    """A Service in the Agent's namespace serving MCP over streamable HTTP."""

    name: str = Field(
        pattern=NAME_PATTERN, max_length=grammar.DNS_LABEL_MAX, description="The Service."
    )
    port: int = Field(ge=1, le=65535, description="Its port.")
    path: str = Field(
        default="/mcp", pattern=r"^/[\x21-\x7e]*$", max_length=1024, description="Default /mcp."
    )


class McpServer(WireModel):
    """An MCP server whose tools the model may call (streamable HTTP transport)."""

    name: str = Field(
        pattern=NAME_PATTERN,
        max_length=grammar.DNS_LABEL_MAX,
        description="A name for the server, unique in the Agent; prefixes nothing.",
    )
    url: str | None = Field(
        default=None,
        pattern=grammar.HTTP_URL_PATTERN,
        max_length=grammar.URL_MAX,
        description="The server's endpoint, such as http://tools:8000/mcp.",
    )
    service: ServiceRef | None = Field(default=None, description="Or a Service serving it.")
    allow: list[str] | None = Field(
        default=None,
        max_length=256,
        description="The tools the model may call; unset: every tool the server lists.",
    )
    timeout: Duration = Field(
        default=timedelta(seconds=30),
        description="Per tool call: a duration such as 30s or 2m; default 30s.",
    )
    idempotent: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="Tools safe to run twice (beside those the server marks idempotentHint).",
    )

    @model_validator(mode="after")
    def _one_endpoint(self) -> McpServer:
        if (self.url is None) == (self.service is None):
            raise ValueError("an MCP server needs exactly one of url and service")
        return self


class AgentTool(WireModel):
    """Another Troupe Agent as a tool: called through its inbox with request/reply; its
    input schema becomes the tool's parameters."""

    agent: str = Field(
        pattern=NAME_PATTERN, max_length=grammar.DNS_LABEL_MAX, description="The Agent's name."
    )
    name: str | None = Field(
        default=None, pattern=TOOL_NAME_PATTERN, description="The tool's name; default the agent's."
    )
    description: str | None = Field(
        default=None, max_length=4096, description="For the model; default the Agent's role."
    )
    timeout: Duration = Field(
        default=timedelta(seconds=30),
        description="How long to wait for its reply: a duration such as 30s or 2m; default 30s.",
    )
    idempotent: bool = Field(
        default=True,
        description="Safe to call twice; default true (Troupe delivers a call's request once, "
        "by its id).",
    )


class A2aAuth(WireModel):
    """How Troupe authenticates to a remote A2A agent."""

    bearer_token_secret: SecretKeySelector = Field(
        description="The Secret key holding a token sent as Authorization: Bearer to the "
        "card's origin only (key default apiKey); the pod reads it from the Secret as an "
        "environment variable, so it is never in the config, the status or the logs."
    )


class A2aAgent(WireModel):
    """A remote agent speaking A2A (v1.0, or 0.3) over JSON-RPC or HTTP+JSON, called as one
    tool: the model sends it a message text (and optional data) and reads the final
    task's artifacts. Its agent card is read once per process, on start."""

    name: str = Field(
        pattern=NAME_PATTERN,
        max_length=grammar.DNS_LABEL_MAX,
        description="The tool's name as the model sees it: a DNS label, unique in "
        "spec.llm.tools.a2a and among all the Agent's tools.",
    )
    url: str = Field(
        pattern=A2A_URL_PATTERN,
        max_length=grammar.URL_MAX,
        description="The agent card's URL (a path ending in .json), or the agent's base URL, "
        "whose card is read from <url>/.well-known/agent-card.json; http or https, no user "
        "info (put a token in auth).",
    )
    auth: A2aAuth | None = Field(
        default=None, description="A bearer token from a Secret; unset: no credentials sent."
    )
    skills: list[SkillId] | None = Field(
        default=None,
        max_length=64,
        description="The ids of the card's skills the model is told of (A2A sends a message "
        "to the agent, not to a skill); unset: every skill on the card.",
    )
    description: str | None = Field(
        default=None,
        max_length=4096,
        description="For the model; default the card's description and skills.",
    )
    timeout: Duration = Field(
        default=timedelta(seconds=30),
        description="How long a call may take, the card's fetch included: a duration such "
        "as 30s or 2m; default 30s.",
    )
    idempotent: bool = Field(
        default=False,
        description="Safe to send twice (retried once when the call fails); default false.",
    )


class FunctionTool(WireModel):
    """A Python function from the agent's code as a tool; its signature gives the schema."""

    entrypoint: str = Field(
        pattern=ENTRYPOINT_PATTERN, max_length=512, description="module:function."
    )
    name: str | None = Field(
        default=None, pattern=TOOL_NAME_PATTERN, description="Default the function's name."
    )
    idempotent: bool = Field(default=False, description="Safe to run twice; default false.")
    timeout: Duration = Field(
        default=timedelta(seconds=30),
        description="How long a call may run: a duration such as 30s or 2m; default 30s.",
    )


class Tools(WireModel):
    """What the model may call."""

    mcp: list[McpServer] = Field(
        default_factory=list,
        max_length=32,
        description="MCP servers (streamable HTTP) whose tools the model may call.",
    )
    agents: list[AgentTool] = Field(
        default_factory=list,
        max_length=64,
        description="Agents of this namespace called as tools, through their inbox.",
    )
    functions: list[FunctionTool] = Field(
        default_factory=list,
        max_length=64,
        description="Python functions of the agent's code called as tools.",
    )
    a2a: list[A2aAgent] = Field(
        default_factory=list,
        alias="a2a",
        max_length=32,
        description="Remote A2A agents, each called as one tool named by its name; names unique.",
    )

    @model_validator(mode="after")
    def _unique_a2a_names(self) -> Tools:
        names = [agent.name for agent in self.a2a]
        if len(set(names)) != len(names):
            raise ValueError(A2A_NAMES_MESSAGE)
        return self


A2A_NAMES_MESSAGE = "spec.llm.tools.a2a names must be unique"


class HistoryPolicy(WireModel):
    """Bounds on what is kept and sent back to the model."""

    max_tool_result_bytes: int = Field(
        default=8192,
        ge=256,
        le=1_048_576,
        description="A tool result larger than this is offloaded to the Object Store and sent "
        "truncated; default 8192.",
    )


class TokenRateLimit(WireModel):
    """The Agent's own tokens per minute, on top of its ModelProviders' limits."""

    tokens_per_minute: int = Field(
        ge=1, le=10**12, description="Tokens (prompt plus max completion) per minute."
    )
    scope: Literal["replica", "global"] = Field(
        default="replica",
        description="replica: each replica has its own bucket; global: all replicas share one "
        "(kept in NATS KV). Default replica.",
    )


class LlmPolicy(WireModel):
    """An LLM agent: a model loop with tools, for ``runtime.handler.type: llm``."""

    model: ModelRef = Field(description="The model to ask first.")
    fallbacks: list[ModelRef] = Field(
        default_factory=list,
        max_length=8,
        description="Models tried in order when the one before answers 429 or 5xx, times out "
        "or its circuit is open.",
    )
    system_prompt: SystemPrompt | None = Field(default=None, description="The system prompt.")
    temperature: float | None = Field(default=None, ge=0, le=2, description="Sampling temperature.")
    max_tokens: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Output tokens per model call."
    )
    max_turns: int = Field(
        default=8, ge=1, le=100, description="Model calls per message; default 8."
    )
    tool_choice: Literal["auto", "required", "none"] = Field(
        default="auto",
        description="auto: the model decides; required: the first turn must call a tool "
        "(small models follow it reliably); none: no tools. Default auto.",
    )
    stream: bool = Field(
        default=True,
        description="Stream token deltas on core NATS (troupe.<ns>.streams.<run>.<id>); "
        "default true.",
    )
    tools: Tools = Field(default_factory=Tools, description="What the model may call.")
    approvals: ToolApprovals = Field(
        default_factory=ToolApprovals,
        description="Which tool calls wait for a person's decision (an Approval) before they "
        "run: a rule per tool and a default; default: none waits.",
    )
    history: HistoryPolicy = Field(default_factory=HistoryPolicy)
    rate_limit: TokenRateLimit | None = Field(
        default=None, description="The Agent's own token rate limit; unset: none."
    )
    session: SessionPolicy | None = Field(
        default=None,
        description="Keep the conversation per session id (A2A's contextId, the sessionid "
        "CloudEvent extension) across messages, replicas and restarts, bounded; unset: "
        "every message stands alone.",
    )
    on_budget_exceeded: Literal["dead-letter", "answer"] = Field(
        default="dead-letter",
        description="When a Budget's hard limit refuses a model call: dead-letter the "
        "message (reason budget-exceeded), or answer with what the loop has so far (only "
        "without an outputSchema). Default dead-letter.",
    )

    def sessions(self) -> SessionPolicy | None:
        """The session policy when sessions are on, else None (no session I/O)."""
        return self.session if self.session is not None and self.session.enabled else None

    def chain(self) -> list[ModelRef]:
        """The models in the order they are tried."""
        return [self.model, *self.fallbacks]
