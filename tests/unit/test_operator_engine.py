"""The pure builders of a workflow's engine: a Workflow spec → EngineConfig, ConfigMap,
Deployment.

The manifests are compared with golden files; regenerate them after an intended
change with ``TROUPE_UPDATE_GOLDEN=1 pytest tests/unit/test_operator_engine.py``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from tests.unit.golden_support import assert_golden
from troupe_operator.api import WorkflowSpec
from troupe_operator.builders import engine
from troupe_operator.builders.pods import Owner
from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.contract.policies import RetryPolicy

OWNER = Owner(
    namespace="shop", name="checkout", uid="0b1c2d3e-0000-4000-8000-000000000002", kind="Workflow"
)
IMAGE = "registry.example/troupe-runtime:1.2.3"
NATS_URL = "nats://nats.troupe-system:4222"

FULL_SPEC: dict[str, Any] = {
    "description": "Reserve, charge, ship.",
    "trigger": {"subject": "shop.orders.placed"},
    "deadline": "10m",
    "maxConcurrentRuns": 25,
    "deadLetter": {"retention": "24h"},
    "nats": {"url": "nats://nats.shop:4222", "credentialsSecret": {"name": "shop-nats"}},
    "steps": [
        {"name": "reserve", "agentRef": "inventory", "input": {"items": "trigger.items"}},
        {
            "name": "charge",
            "agentRef": "payments",
            "dependsOn": ["reserve"],
            "timeout": "30s",
            "retry": {"maxAttempts": 3, "backoff": ["1s", "5s"]},
            "onFailure": "compensate",
            "compensation": {"agentRef": "refunds", "input": {"charge": "steps.charge.output"}},
        },
        {"name": "ship", "agentRef": "shipping", "dependsOn": ["charge"]},
    ],
}


@pytest.fixture
def spec() -> WorkflowSpec:
    return WorkflowSpec.model_validate(FULL_SPEC)


@pytest.fixture
def config(spec: WorkflowSpec) -> EngineConfig:
    return engine.build_engine_config(OWNER, spec, NATS_URL)


def test_engine_config_map_matches_golden(config: EngineConfig) -> None:
    assert_golden("engine_configmap", engine.build_engine_config_map(OWNER, config))


def test_engine_deployment_matches_golden(spec: WorkflowSpec, config: EngineConfig) -> None:
    assert_golden("engine_deployment", engine.build_engine_deployment(OWNER, spec, config, IMAGE))


def test_steps_name_their_agents_inbox_subjects(config: EngineConfig) -> None:
    assert [(s.name, s.agent, s.subject) for s in config.steps] == [
        ("reserve", "inventory", "troupe.shop.agents.inventory.in.p0"),
        ("charge", "payments", "troupe.shop.agents.payments.in.p0"),
        ("ship", "shipping", "troupe.shop.agents.shipping.in.p0"),
    ]
    charge = config.step("charge")
    assert charge.compensation is not None
    assert charge.compensation.subject == "troupe.shop.agents.refunds.in.p0"
    assert charge.compensation.input == {"charge": "steps.charge.output"}
    assert (charge.depends_on, charge.on_failure) == (["reserve"], "compensate")


def test_a_step_without_timeout_or_retry_gets_five_minutes_and_one_attempt(
    config: EngineConfig,
) -> None:
    reserve, charge = config.step("reserve"), config.step("charge")

    assert (reserve.timeout, reserve.retry.max_attempts) == (timedelta(minutes=5), 1)
    assert reserve.input == {"items": "trigger.items"}
    assert charge.timeout == timedelta(seconds=30)
    assert charge.retry == RetryPolicy(
        max_attempts=3, backoff=[timedelta(seconds=1), timedelta(seconds=5)]
    )


def test_workflow_settings_and_nats_reach_the_engine(config: EngineConfig) -> None:
    assert (config.workflow, config.namespace, config.trigger_subject) == (
        "checkout",
        "shop",
        "shop.orders.placed",
    )
    assert (config.deadline, config.max_concurrent_runs) == (timedelta(minutes=10), 25)
    assert config.dead_letter.retention == timedelta(hours=24)
    assert config.nats.url == "nats://nats.shop:4222"
    assert str(config.nats.credentials_file) == "/var/run/troupe/nats/credentials/nats.creds"


def test_a_workflow_without_nats_url_uses_the_operators() -> None:
    spec = WorkflowSpec.model_validate(
        {"trigger": {"subject": "go"}, "steps": [{"name": "a", "agentRef": "a"}]}
    )

    assert engine.build_engine_config(OWNER, spec, NATS_URL).nats.url == NATS_URL


def test_config_map_holds_what_the_engine_reads_back(config: EngineConfig) -> None:
    data = engine.build_engine_config_map(OWNER, config)["data"]["config.json"]

    assert EngineConfig.model_validate_json(data) == config


def test_one_engine_replica_replaced_without_overlap(
    spec: WorkflowSpec, config: EngineConfig
) -> None:
    deployment = engine.build_engine_deployment(OWNER, spec, config, IMAGE)

    assert deployment["metadata"]["name"] == "checkout-engine"
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert deployment["spec"]["selector"] == {"matchLabels": {"troupe.dev/workflow": "checkout"}}


def test_engine_runs_the_workflow_module_with_its_config_from_the_config_map(
    spec: WorkflowSpec, config: EngineConfig
) -> None:
    pod = engine.build_engine_deployment(OWNER, spec, config, IMAGE)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    (config_mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/troupe"]

    assert container["command"] == ["python", "-m", "troupe_runtime.workflow"]
    assert container["image"] == IMAGE
    assert volumes[config_mount["name"]]["configMap"] == {
        "name": "checkout-engine",
        "items": [{"key": "config.json", "path": "config.json"}],
    }
    assert config_mount["readOnly"] is True
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    credentials = {"secretName": "shop-nats", "defaultMode": 0o440}
    assert {"name": "nats-credentials", "secret": credentials} in pod["volumes"]


def test_engine_pods_comply_with_the_restricted_pod_security_profile(
    spec: WorkflowSpec, config: EngineConfig
) -> None:
    pod = engine.build_engine_deployment(OWNER, spec, config, IMAGE)["spec"]["template"]["spec"]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def test_a_spec_change_rolls_the_engine(spec: WorkflowSpec) -> None:
    changed = spec.model_copy(update={"max_concurrent_runs": 26})

    def template_hash(workflow: WorkflowSpec) -> str:
        config = engine.build_engine_config(OWNER, workflow, NATS_URL)
        template = engine.build_engine_deployment(OWNER, workflow, config, IMAGE)["spec"][
            "template"
        ]
        annotation: str = template["metadata"]["annotations"]["troupe.dev/config-hash"]
        return annotation

    assert template_hash(spec) == template_hash(spec)
    assert template_hash(changed) != template_hash(spec)


def test_engine_objects_are_owned_by_their_workflow(
    spec: WorkflowSpec, config: EngineConfig
) -> None:
    manifests = [
        engine.build_engine_config_map(OWNER, config),
        engine.build_engine_deployment(OWNER, spec, config, IMAGE),
    ]

    for manifest in manifests:
        (owner,) = manifest["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("Workflow", OWNER.name, OWNER.uid)
        assert owner["controller"] is True
