"""An Agent spec → its runtime config, ConfigMap, ServiceAccount and Deployment.

The runtime config is the runtime's own model (``troupe_runtime.contract.agent_config``); the
ConfigMap carries its JSON, mounted into the container as a file (``pod.CONFIG_PATH``),
and its hash annotates the pod template so that any change rolls the pods. What the
agents' pods share with the workflow engines' is in ``builders.pods``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from troupe_operator.api import AgentSpec
from troupe_operator.api.agent import AgentRuntime
from troupe_operator.builders import llm as llm_builders
from troupe_operator.builders import pods
from troupe_operator.builders.pods import (
    FIELD_MANAGER,
    ConfigMapReference,
    Owner,
    SecretReference,
)
from troupe_runtime.contract import llm, naming, pod
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.llm import LlmRuntime

AGENT_LABEL = "troupe.dev/agent"


CODE_VOLUME = "handler-code"
CODE_DIR = Path("/opt/troupe/code")


def agent_labels(name: str) -> dict[str, str]:
    """Labels on every object of an agent; the Deployment selects its pods by these."""
    return {
        "app.kubernetes.io/name": "troupe-agent",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        AGENT_LABEL: name,
    }


def config_map_name(agent: str) -> str:
    return naming.agent_config_map(agent)


def service_account_name(owner: Owner, spec: AgentSpec) -> str | None:
    """The pods' ServiceAccount: the one named, else the agent's own if created, else none."""
    runtime = spec.runtime
    if runtime.service_account_name:
        return runtime.service_account_name
    return naming.agent_service_account(owner.name) if runtime.create_service_account else None


def build_runtime_config(
    owner: Owner,
    spec: AgentSpec,
    default_nats_url: str,
    llm_runtime: LlmRuntime | None = None,
    default_replicas: int = 1,
) -> RuntimeConfig:
    """The runtime's config: the spec's policies, unchanged, plus what the operator resolved
    (``llm_runtime``: ``spec.llm`` with its providers and tools, ``builders.llm.resolve``)."""
    return RuntimeConfig(
        agent=owner.name,
        namespace=owner.namespace,
        role=spec.role,
        handler=spec.runtime.handler,
        contract=spec.contract,
        messaging=spec.messaging,
        rate_limit=spec.rate_limit,
        timeout=spec.timeout,
        retry=spec.retry,
        dead_letter=spec.dead_letter,
        state=spec.state,
        nats=pods.nats_settings(spec.nats, default_nats_url, default_replicas),
        llm=llm_runtime,
    )


def referenced_secrets(spec: AgentSpec) -> list[SecretReference]:
    """Every Secret the spec names, one reference per key the pods need, so that a missing
    Secret or key is reported before pods wait on it."""
    references = pods.nats_secrets(spec.nats)
    handler = spec.runtime.handler
    if handler.secret_name:
        keys: list[str | None] = [*llm_secret_keys(spec)] or [None]
        references.extend(
            SecretReference("spec.runtime.handler.secretName", handler.secret_name, key)
            for key in keys
        )
    return references


def llm_secret_keys(spec: AgentSpec) -> list[str]:
    """The keys an llm handler's Secret must have: the non-optional ones, and the model's
    when ``handler.model`` does not name one (the runtime refuses to start without)."""
    handler = spec.runtime.handler
    if handler.type != "llm":
        return []
    return [
        key
        for env, key, optional in llm.SECRET_KEYS
        if not optional or (env == llm.MODEL_ENV and handler.model is None)
    ]


def referenced_config_maps(spec: AgentSpec) -> list[ConfigMapReference]:
    """Every ConfigMap the spec names, so a missing one is reported before pods wait on it."""
    code = spec.runtime.code
    references = (
        [] if code is None else [ConfigMapReference("spec.runtime.code.configMap", code.config_map)]
    )
    return references + llm_builders.prompt_config_maps(spec.llm)


def config_hash(config: RuntimeConfig) -> str:
    return pods.config_hash(config.to_json())


def build_config_map(owner: Owner, config: RuntimeConfig) -> dict[str, Any]:
    return pods.config_map(
        owner, config_map_name(owner.name), agent_labels(owner.name), config.to_json()
    )


def build_service_account(owner: Owner, spec: AgentSpec) -> dict[str, Any] | None:
    """The agent's ServiceAccount, when the spec asks the operator to create one."""
    name = service_account_name(owner, spec)
    if not spec.runtime.create_service_account or name is None:
        return None
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": pods.metadata(owner, name, agent_labels(owner.name)),
        "automountServiceAccountToken": False,
    }


def _runtime_container(
    owner: Owner, spec: AgentSpec, config: RuntimeConfig, secret_mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    runtime = spec.runtime
    container = pods.runtime_container(
        pods.Container(
            image=runtime.image,
            image_pull_policy=runtime.image_pull_policy,
            command=list(pod.AGENT_COMMAND),
            health_port=config.health_port,
            extra_env=[
                *([{"name": "PYTHONPATH", "value": str(CODE_DIR)}] if runtime.code else []),
                *llm_env(runtime),
                *llm_builders.key_env(config.llm),
                *(e.model_dump(by_alias=True, exclude_none=True) for e in runtime.env),
            ],
            secret_mounts=secret_mounts,
        )
    )
    if runtime.env_from:
        container["envFrom"] = list(runtime.env_from)
    resources = runtime.resources.model_dump(by_alias=True)
    if any(resources.values()):
        container["resources"] = {kind: value for kind, value in resources.items() if value}
    return container


def llm_env(runtime: AgentRuntime) -> list[dict[str, Any]]:
    """The llm handler's endpoint, key and model, from the Secret the handler names."""
    secret = runtime.handler.secret_name
    if runtime.handler.type != "llm" or secret is None:
        return []
    return [
        {
            "name": env,
            "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}},
        }
        for env, key, optional in llm.SECRET_KEYS
    ]


def code_volume(runtime: AgentRuntime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The handler-code ConfigMap's volume and read-only mount, if the agent has one."""
    if runtime.code is None:
        return [], []
    return (
        [{"name": CODE_VOLUME, "configMap": {"name": runtime.code.config_map}}],
        [{"name": CODE_VOLUME, "mountPath": str(CODE_DIR), "readOnly": True}],
    )


def most_replicas(spec: AgentSpec) -> int:
    """The most pods the agent may run: what its consumers' maxAckPending is sized for."""
    autoscale = spec.runtime.autoscale
    return spec.runtime.replicas if autoscale is None else autoscale.max_replicas


def build_deployment(owner: Owner, spec: AgentSpec, config: RuntimeConfig) -> dict[str, Any]:
    """The runtime's Deployment, compliant with the restricted Pod Security profile; with
    ``runtime.autoscale`` its replicas are left to the autoscaler (``builders.autoscale``)."""
    runtime = spec.runtime
    secret_volumes, secret_mounts = pods.nats_secret_volumes(spec.nats)
    code_volumes, code_mounts = code_volume(runtime)
    prompt_volumes, prompt_mounts = llm_builders.prompt_volume(config.llm)
    secret_volumes = secret_volumes + code_volumes + prompt_volumes
    secret_mounts = secret_mounts + code_mounts + prompt_mounts
    pod_spec = pods.restricted_pod_spec(
        [_runtime_container(owner, spec, config, secret_mounts), *runtime.sidecars],
        config_map_name(owner.name),
        secret_volumes,
    )
    account = service_account_name(owner, spec)
    if account:
        pod_spec["serviceAccountName"] = account
    if runtime.node_selector:
        pod_spec["nodeSelector"] = dict(runtime.node_selector)
    if runtime.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in runtime.tolerations
        ]
    return pods.deployment(
        owner,
        naming.agent_deployment(owner.name),
        agent_labels(owner.name),
        {AGENT_LABEL: owner.name},
        None if runtime.autoscale is not None else runtime.replicas,
        config.to_json(),
        config.health_port,
        pod_spec,
    )
