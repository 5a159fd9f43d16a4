"""An LLM agent's ``spec.llm`` → what its runtime needs (``contract.llm.LlmRuntime``).

Pure: the pass reads the ModelProviders and the Agents the policy names and hands them in
(``None`` for one that does not exist, ``INVALID`` for one whose spec the models refuse);
this module resolves them, or says what is missing, naming the field. Nothing secret passes
through here: a provider's key, or a remote A2A agent's bearer token, stays in its Secret,
and the pod reads it as an environment variable (``provider_key_env``, ``a2a_token_env``)
from a ``secretKeyRef``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from troupe_operator.api import AgentSpec, ModelProviderSpec
from troupe_operator.builders.pods import ConfigMapReference, SecretReference
from troupe_operator.builders.problems import Problem
from troupe_runtime.contract import naming
from troupe_runtime.contract.llm import (
    SYSTEM_PROMPT_DIR,
    LlmRuntime,
    ResolvedProvider,
    ResolvedTool,
    a2a_token_env,
    provider_key_env,
)
from troupe_runtime.contract.llm_policy import LlmPolicy, McpServer

PROVIDER_MISSING = "ProviderMissing"
PROVIDER_INVALID = "ProviderInvalid"
MODEL_NOT_SERVED = "ModelNotServed"
AGENT_TOOL_MISSING = "AgentToolMissing"
REASONS = frozenset({PROVIDER_MISSING, PROVIDER_INVALID, MODEL_NOT_SERVED, AGENT_TOOL_MISSING})
"""The problems of resolving ``spec.llm``: all on the ``LlmResolved`` sub-condition."""

PROMPT_VOLUME = "system-prompt"
MODELS_NAMED = 8
"""Model names a ModelNotServed message lists."""


class _Invalid:
    """A referenced object exists but the models refuse its spec."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID: Final = _Invalid()
Found = Any
"""What a read found: the parsed spec, ``None`` (absent) or ``INVALID``."""


def provider_names(policy: LlmPolicy) -> list[str]:
    """Every ModelProvider the chain names, each once, in order."""
    return list(dict.fromkeys(ref.provider for ref in policy.chain()))


def callee_names(policy: LlmPolicy) -> list[str]:
    """Every Agent the policy calls as a tool, each once, in order."""
    return list(dict.fromkeys(tool.agent for tool in policy.tools.agents))


def _chain_fields(policy: LlmPolicy) -> list[str]:
    return ["spec.llm.model", *(f"spec.llm.fallbacks[{i}]" for i in range(len(policy.fallbacks)))]


def mcp_url(namespace: str, server: McpServer) -> str:
    """The server's endpoint: its URL, or the cluster DNS name of the Service it names."""
    if server.url is not None:
        return server.url
    assert server.service is not None, "the contract requires a url or a service"
    service = server.service
    return f"http://{service.name}.{namespace}.svc:{service.port}{service.path}"


@dataclass(frozen=True)
class Resolution:
    """``spec.llm`` resolved, or the problems that keep it from being so."""

    runtime: LlmRuntime | None
    problems: list[Problem]


def resolve(
    namespace: str,
    policy: LlmPolicy,
    providers: Mapping[str, Found],
    callees: Mapping[str, Found],
) -> Resolution:
    """The runtime's view of ``policy``; a problem per provider, model or callee that is
    missing or refused, each naming its field."""
    problems: list[Problem] = []
    resolved: dict[str, ResolvedProvider] = {}
    for where, ref in zip(_chain_fields(policy), policy.chain(), strict=True):
        found = providers.get(ref.provider)
        if found is None:
            problems.append(
                Problem(
                    f"{where}.provider",
                    PROVIDER_MISSING,
                    f"ModelProvider {ref.provider} does not exist in namespace {namespace}: "
                    "apply it (the Agent turns Ready when it appears) or fix the name",
                )
            )
            continue
        if found is INVALID:
            problems.append(
                Problem(
                    f"{where}.provider",
                    PROVIDER_INVALID,
                    f"ModelProvider {ref.provider} has a spec the operator refuses: see its "
                    "status, and fix it",
                )
            )
            continue
        spec: ModelProviderSpec = found
        if spec.model(ref.model) is None:
            served = ", ".join(m.name for m in spec.models[:MODELS_NAMED])
            extra = len(spec.models) - MODELS_NAMED
            more = f" and {extra} more" if extra > 0 else ""
            problems.append(
                Problem(
                    f"{where}.model",
                    MODEL_NOT_SERVED,
                    f"ModelProvider {ref.provider} does not serve {ref.model}: its spec.models "
                    f"are {served}{more}; name one of them or add it to the provider",
                )
            )
            continue
        resolved.setdefault(
            ref.provider,
            ResolvedProvider(
                name=ref.provider,
                spec=spec,
                api_key_env=provider_key_env(ref.provider) if spec.api_key_secret else None,
            ),
        )
    agents: list[ResolvedTool] = []
    for index, tool in enumerate(policy.tools.agents):
        callee = callees.get(tool.agent)
        if callee is None or callee is INVALID:
            state = "does not exist" if callee is None else "has a spec the operator refuses"
            problems.append(
                Problem(
                    f"spec.llm.tools.agents[{index}].agent",
                    AGENT_TOOL_MISSING,
                    f"Agent {tool.agent} {state} in namespace {namespace}: apply it (this "
                    "Agent turns Ready when it appears) or fix the name",
                )
            )
            continue
        callee_spec: AgentSpec = callee
        agents.append(
            ResolvedTool(
                name=tool.name or tool.agent,
                inbox_subject=naming.inbox_subject(namespace, tool.agent, 0),
                input_schema=callee_spec.contract.input_schema,
                description=tool.description or callee_spec.role,
            )
        )
    if problems:
        return Resolution(None, problems)
    prompt = policy.system_prompt
    key_ref = prompt.config_map_key_ref if prompt is not None else None
    runtime = LlmRuntime(
        policy=policy,
        providers=list(resolved.values()),
        system_prompt_file=SYSTEM_PROMPT_DIR / key_ref.key if key_ref is not None else None,
        mcp=[
            ResolvedTool(name=server.name, url=mcp_url(namespace, server))
            for server in policy.tools.mcp
        ],
        agents=agents,
        a2a=[
            ResolvedTool(
                name=agent.name,
                url=agent.url,
                token_env=a2a_token_env(agent.name) if agent.auth is not None else None,
            )
            for agent in policy.tools.a2a
        ],
    )
    return Resolution(runtime, [])


def provider_secrets(runtime: LlmRuntime | None) -> list[SecretReference]:
    """The provider Secrets the pods read keys from, so a missing one is reported first."""
    if runtime is None:
        return []
    return [
        SecretReference(
            f"spec.llm (ModelProvider {provider.name}, spec.apiKeySecret)",
            provider.spec.api_key_secret.name,
            provider.spec.api_key_secret.key,
        )
        for provider in runtime.providers
        if provider.spec.api_key_secret is not None
    ]


def a2a_secrets(policy: LlmPolicy | None) -> list[SecretReference]:
    """The Secrets of the remote A2A agents' bearer tokens, so a missing one is reported
    before pods wait on it."""
    if policy is None:
        return []
    return [
        SecretReference(
            f"spec.llm.tools.a2a[{index}].auth.bearerTokenSecret",
            agent.auth.bearer_token_secret.name,
            agent.auth.bearer_token_secret.key,
        )
        for index, agent in enumerate(policy.tools.a2a)
        if agent.auth is not None
    ]


def prompt_config_maps(policy: LlmPolicy | None) -> list[ConfigMapReference]:
    """The system prompt's ConfigMap key, when the prompt comes from one."""
    prompt = policy.system_prompt if policy is not None else None
    if prompt is None or prompt.config_map_key_ref is None:
        return []
    ref = prompt.config_map_key_ref
    return [ConfigMapReference("spec.llm.systemPrompt.configMapKeyRef", ref.name, ref.key)]


def key_env(runtime: LlmRuntime | None) -> list[dict[str, Any]]:
    """Each provider's API key and each remote A2A agent's bearer token as an environment
    variable from its Secret: never a value in the ConfigMap or the Deployment."""
    if runtime is None:
        return []
    tokens = {tool.name: tool.token_env for tool in runtime.a2a if tool.token_env}
    a2a = [
        {
            "name": tokens[agent.name],
            "valueFrom": {
                "secretKeyRef": {
                    "name": agent.auth.bearer_token_secret.name,
                    "key": agent.auth.bearer_token_secret.key,
                }
            },
        }
        for agent in runtime.policy.tools.a2a
        if agent.auth is not None and agent.name in tokens
    ]
    keys = [
        {
            "name": provider.api_key_env,
            "valueFrom": {
                "secretKeyRef": {
                    "name": provider.spec.api_key_secret.name,
                    "key": provider.spec.api_key_secret.key,
                }
            },
        }
        for provider in runtime.providers
        if provider.api_key_env is not None and provider.spec.api_key_secret is not None
    ]
    return keys + a2a


def prompt_volume(runtime: LlmRuntime | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The system prompt's ConfigMap key as a file at ``SYSTEM_PROMPT_DIR/<key>``, read-only
    (a mounted key follows edits; an env var would not)."""
    prompt = runtime.policy.system_prompt if runtime is not None else None
    if prompt is None or prompt.config_map_key_ref is None:
        return [], []
    ref = prompt.config_map_key_ref
    volume = {
        "name": PROMPT_VOLUME,
        "configMap": {"name": ref.name, "items": [{"key": ref.key, "path": ref.key}]},
    }
    mount = {"name": PROMPT_VOLUME, "mountPath": str(SYSTEM_PROMPT_DIR), "readOnly": True}
    return [volume], [mount]


def names_provider(raw_spec: Mapping[str, Any], provider: str) -> bool:
    """Whether a raw Agent spec's ``llm`` chain names ``provider`` (read tolerantly)."""
    llm = raw_spec.get("llm") if isinstance(raw_spec, Mapping) else None
    if not isinstance(llm, Mapping):
        return False
    refs = [llm.get("model"), *(llm.get("fallbacks") or [])]
    return any(isinstance(ref, Mapping) and ref.get("provider") == provider for ref in refs)


def calls_agent(raw_spec: Mapping[str, Any], agent: str) -> bool:
    """Whether a raw Agent spec's ``llm.tools.agents`` names ``agent`` (read tolerantly)."""
    llm = raw_spec.get("llm") if isinstance(raw_spec, Mapping) else None
    tools = llm.get("tools") if isinstance(llm, Mapping) else None
    agents = tools.get("agents") if isinstance(tools, Mapping) else None
    return isinstance(agents, list) and any(
        isinstance(tool, Mapping) and tool.get("agent") == agent for tool in agents
    )
