"""The pure builders: an Agent spec → runtime config, ConfigMap, ServiceAccount, Deployment.

The manifests are compared with golden files; regenerate them after an intended
change with ``TROUPE_UPDATE_GOLDEN=1 pytest tests/unit/test_operator_builders.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.golden_support import assert_golden
from troupe_operator.api import AgentSpec
from troupe_operator.builders import workload
from troupe_operator.builders.pods import Owner
from troupe_runtime.contract.agent_config import RuntimeConfig

OWNER = Owner(namespace="research", name="summariser", uid="0b1c2d3e-0000-4000-8000-000000000001")
NATS_URL = "nats://nats.troupe-system:4222"

FULL_SPEC: dict[str, Any] = {
    "role": "Summarise documents",
    "description": "Reads a document, writes a summary.",
    "contract": {
        "inputSchema": {"type": "object", "required": ["text"]},
        "outputSubjects": ["troupe.research.summaries"],
        "errorStates": [{"name": "TooLong", "retryable": False}],
    },
    "runtime": {
        "image": "registry.example/troupe-runtime:1.2.3",
        "handler": {"type": "python", "entrypoint": "summariser.handlers:summarise"},
        "replicas": 2,
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "256Mi"},
        },
        "env": [{"name": "LOG_LEVEL", "value": "debug"}],
        "envFrom": [{"secretRef": {"name": "summariser-env"}}],
        "createServiceAccount": True,
        "nodeSelector": {"type": "kwok"},
        "tolerations": [
            {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}
        ],
    },
    "messaging": {"maxInFlight": 4, "ackWait": "45s", "priorityLevels": 2},
    "rateLimit": {"rate": 2.5, "burst": 5, "scope": "global"},
    "timeout": "20s",
    "retry": {"maxAttempts": 4, "backoff": ["1s", "10s"]},
    "deadLetter": {"retention": "72h"},
    "state": [{"name": "notes", "history": 3}],
    "nats": {"credentialsSecret": {"name": "nats-user"}, "tls": {"secretName": "nats-tls"}},
}


@pytest.fixture
def spec() -> AgentSpec:
    return AgentSpec.model_validate(FULL_SPEC)


@pytest.fixture
def config(spec: AgentSpec) -> RuntimeConfig:
    return workload.build_runtime_config(OWNER, spec, NATS_URL)


def test_config_map_matches_golden(config: RuntimeConfig) -> None:
    assert_golden("agent_configmap", workload.build_config_map(OWNER, config))


def test_deployment_matches_golden(spec: AgentSpec, config: RuntimeConfig) -> None:
    assert_golden("agent_deployment", workload.build_deployment(OWNER, spec, config))


def test_service_account_matches_golden(spec: AgentSpec) -> None:
    assert_golden("agent_serviceaccount", workload.build_service_account(OWNER, spec))


def test_config_map_holds_what_the_runtime_reads_back(config: RuntimeConfig) -> None:
    data = workload.build_config_map(OWNER, config)["data"]["config.json"]

    read = RuntimeConfig.model_validate_json(data)

    assert read == config
    assert read.retry.max_attempts == 4
    assert str(read.nats.credentials_file) == "/var/run/troupe/nats/credentials/nats.creds"


def test_runtime_config_embeds_the_spec_policies_unchanged(
    spec: AgentSpec, config: RuntimeConfig
) -> None:
    assert (config.handler, config.contract, config.messaging) == (
        spec.runtime.handler,
        spec.contract,
        spec.messaging,
    )
    assert (config.rate_limit, config.retry, config.dead_letter, config.state) == (
        spec.rate_limit,
        spec.retry,
        spec.dead_letter,
        spec.state,
    )


def test_agent_without_nats_url_uses_the_operators() -> None:
    spec = AgentSpec.model_validate({"role": "echo"})

    config = workload.build_runtime_config(OWNER, spec, NATS_URL)

    assert config.nats.url == NATS_URL
    assert config.nats.credentials_file is None


def test_deployment_complies_with_the_restricted_pod_security_profile(
    spec: AgentSpec, config: RuntimeConfig
) -> None:
    pod = workload.build_deployment(OWNER, spec, config)["spec"]["template"]["spec"]
    (runtime, *_) = pod["containers"]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert runtime["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert all(volume.keys() & {"emptyDir", "secret", "configMap"} for volume in pod["volumes"])


def test_deployment_mounts_the_config_read_only_and_probes_the_health_port(
    spec: AgentSpec, config: RuntimeConfig
) -> None:
    pod = workload.build_deployment(OWNER, spec, config)["spec"]["template"]["spec"]
    (runtime, *_) = pod["containers"]
    env = {e["name"]: e for e in runtime["env"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in runtime["volumeMounts"]}

    assert volumes[mounts["/etc/troupe"]["name"]]["configMap"] == {
        "name": "summariser-runtime",
        "items": [{"key": "config.json", "path": "config.json"}],
    }
    assert mounts["/etc/troupe"]["readOnly"] is True
    assert not any(name.startswith("TROUPE_CONFIG") for name in env)
    assert runtime["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert runtime["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"}]
    assert runtime["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert runtime["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}


def test_a_spec_change_changes_the_pod_template_config_hash(spec: AgentSpec) -> None:
    changed = spec.model_copy(update={"timeout": spec.timeout * 2})

    def template_hash(agent: AgentSpec) -> str:
        config = workload.build_runtime_config(OWNER, agent, NATS_URL)
        template = workload.build_deployment(OWNER, agent, config)["spec"]["template"]
        annotation: str = template["metadata"]["annotations"]["troupe.dev/config-hash"]
        return annotation

    assert template_hash(spec) == template_hash(spec)
    assert template_hash(changed) != template_hash(spec)


def test_every_object_is_owned_by_its_agent(spec: AgentSpec, config: RuntimeConfig) -> None:
    manifests = [
        workload.build_config_map(OWNER, config),
        workload.build_deployment(OWNER, spec, config),
        workload.build_service_account(OWNER, spec),
    ]

    for manifest in manifests:
        assert manifest is not None
        (owner,) = manifest["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("Agent", OWNER.name, OWNER.uid)
        assert owner["controller"] is True


def test_no_service_account_is_built_unless_asked_for() -> None:
    spec = AgentSpec.model_validate({"role": "echo", "runtime": {"serviceAccountName": "shared"}})
    config = workload.build_runtime_config(OWNER, spec, NATS_URL)

    assert workload.build_service_account(OWNER, spec) is None
    pod = workload.build_deployment(OWNER, spec, config)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "shared"


def test_referenced_secrets_name_the_fields_that_reference_them(spec: AgentSpec) -> None:
    assert [(s.field, s.name, s.key) for s in workload.referenced_secrets(spec)] == [
        ("spec.nats.credentialsSecret", "nats-user", "nats.creds"),
        ("spec.nats.tls.secretName", "nats-tls", "ca.crt"),
        ("spec.nats.tls.secretName", "nats-tls", "tls.crt"),
        ("spec.nats.tls.secretName", "nats-tls", "tls.key"),
    ]


def test_handler_code_config_map_is_mounted_read_only_and_importable() -> None:
    spec = AgentSpec.model_validate(
        {
            "role": "retrieve",
            "runtime": {
                "handler": {"type": "python", "entrypoint": "research:retrieve"},
                "code": {"configMap": "research-handlers"},
            },
        }
    )
    config = workload.build_runtime_config(OWNER, spec, NATS_URL)

    pod = workload.build_deployment(OWNER, spec, config)["spec"]["template"]["spec"]

    assert {"name": "handler-code", "configMap": {"name": "research-handlers"}} in pod["volumes"]
    container = pod["containers"][0]
    assert {
        "name": "handler-code",
        "mountPath": "/opt/troupe/code",
        "readOnly": True,
    } in container["volumeMounts"]
    assert {"name": "PYTHONPATH", "value": "/opt/troupe/code"} in container["env"]


def test_an_llm_handler_gets_its_endpoint_key_and_model_from_its_secret() -> None:
    spec = AgentSpec.model_validate(
        {"role": "chat", "runtime": {"handler": {"type": "llm", "secretName": "openai"}}}
    )
    config = workload.build_runtime_config(OWNER, spec, NATS_URL)

    container = workload.build_deployment(OWNER, spec, config)["spec"]["template"]["spec"][
        "containers"
    ][0]

    from_secret = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert from_secret["TROUPE_LLM_BASE_URL"] == {
        "name": "openai",
        "key": "baseUrl",
        "optional": False,
    }
    assert from_secret["TROUPE_LLM_API_KEY"]["key"] == "apiKey"
    assert from_secret["TROUPE_LLM_MODEL"] == {"name": "openai", "key": "model", "optional": True}


def test_a_tls_secret_without_a_client_certificate_needs_only_the_ca() -> None:
    spec = AgentSpec.model_validate(
        {"role": "r", "nats": {"tls": {"secretName": "ca", "clientCertificate": False}}}
    )

    assert [(s.name, s.key) for s in workload.referenced_secrets(spec)] == [("ca", "ca.crt")]


@pytest.mark.parametrize(
    ("handler", "keys"),
    [
        ({"type": "llm", "secretName": "openai"}, ["baseUrl", "apiKey", "model"]),
        ({"type": "llm", "secretName": "openai", "model": "gpt-x"}, ["baseUrl", "apiKey"]),
    ],
)
def test_an_llm_handlers_secret_must_hold_every_key_the_runtime_cannot_start_without(
    handler: dict[str, Any], keys: list[str]
) -> None:
    spec = AgentSpec.model_validate({"role": "chat", "runtime": {"handler": handler}})

    references = workload.referenced_secrets(spec)

    assert [(s.field, s.name, s.key) for s in references] == [
        ("spec.runtime.handler.secretName", "openai", key) for key in keys
    ]
