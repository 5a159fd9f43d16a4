"""The API server itself enforces the Agent and Workflow APIs: the shipped CRDs refuse
invalid manifests with a message naming the field, and fill in defaults."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.integration.operator_support import agent, install_crds, workflow
from troupe_devcluster.fixtures import ClusterEndpoints


@pytest.fixture(scope="module")
def crds(cluster: ClusterEndpoints) -> None:
    install_crds(cluster)


def _workflow(**overrides: Any) -> dict[str, Any]:
    manifest = workflow(
        "pipeline",
        [
            {"name": "fetch", "agentRef": "fetcher"},
            {"name": "summarise", "agentRef": "summariser", "dependsOn": ["fetch"]},
        ],
    )
    manifest["spec"].update(overrides)
    return manifest


def _steps(*steps: dict[str, Any]) -> dict[str, Any]:
    return _workflow(steps=list(steps))


def _without_role() -> dict[str, Any]:
    manifest = agent("no-role")
    del manifest["spec"]["role"]
    return manifest


INVALID = [
    pytest.param(
        agent("a", runtime={"replicas": "two"}),
        ["spec.runtime.replicas", "integer"],
        id="wrong-type",
    ),
    pytest.param(
        agent("a", rateLimit={"rate": -1}),
        ["spec.rateLimit.rate", "greater than 0"],
        id="negative-rate",
    ),
    pytest.param(
        agent("a", timeout="5 minutes"), ["spec.timeout", "should match"], id="bad-duration"
    ),
    pytest.param(
        agent("a", messaging={"ackWait": "30"}),
        ["spec.messaging.ackWait"],
        id="duration-without-unit",
    ),
    pytest.param(_without_role(), ["spec.role", "Required value"], id="missing-role"),
    pytest.param(
        agent("a", retry={"maxAttempts": 2, "backoff": ["1s", "2s", "4s"]}),
        ["spec.retry.backoff", "backoff must not list more delays than maxAttempts"],
        id="backoff-longer-than-max-attempts",
    ),
    pytest.param(
        agent("a", deletionPolicy="Keep"),
        ["spec.deletionPolicy", "Unsupported value"],
        id="bad-enum",
    ),
    pytest.param(
        agent("a", messaging={"maxInFlight": 0}),
        ["spec.messaging.maxInFlight", "greater than or equal to 1"],
        id="zero-in-flight",
    ),
    pytest.param(
        agent("a", runtime={"handler": {"type": "python"}}),
        ["spec.runtime.handler.entrypoint", "needs an entrypoint"],
        id="python-handler-without-entrypoint",
    ),
    pytest.param(
        agent("a", state=[{"name": "notes"}, {"name": "notes"}]),
        ["spec.state", "state bucket names must be unique"],
        id="duplicate-buckets",
    ),
    pytest.param(
        agent("a", state=[{"name": "Notes"}]), ["spec.state[0].name"], id="bad-bucket-name"
    ),
    pytest.param(agent("a", bogus=True), ['unknown field "spec.bogus"'], id="unknown-field"),
    pytest.param(agent("a" * 64), ["metadata.name", "Too long"], id="name-too-long"),
    pytest.param(
        _steps(
            {"name": "fetch", "agentRef": "fetcher"},
            {"name": "summarise", "agentRef": "s", "dependsOn": ["fecth"]},
        ),
        ["spec.steps", "every dependsOn must name a step of this workflow"],
        id="unknown-dependency",
    ),
    pytest.param(
        _steps({"name": "fetch", "agentRef": "fetcher", "dependsOn": ["fetch"]}),
        ["spec.steps[0].dependsOn", "a step must not depend on itself"],
        id="self-dependency",
    ),
    pytest.param(
        _steps({"name": "fetch", "agentRef": "a"}, {"name": "fetch", "agentRef": "b"}),
        ["spec.steps", "step names must be unique"],
        id="duplicate-step-names",
    ),
    pytest.param(_steps(), ["spec.steps", "at least 1"], id="no-steps"),
    pytest.param(
        _steps({"name": "fetch", "agentRef": "a", "onFailure": "retry"}),
        ["spec.steps[0].onFailure", "Unsupported value"],
        id="bad-on-failure",
    ),
    pytest.param(
        _steps({"name": "fetch", "agentRef": "a", "onFailure": "compensate"}),
        ["spec.steps[0].compensation", "onFailure: compensate needs a compensation"],
        id="compensate-without-compensation",
    ),
    pytest.param(
        _steps({"name": "fetch"}),
        ["spec.steps[0]", "exactly one of agentRef (an Agent handles it) or approval"],
        id="step-without-agent-or-approval",
    ),
    pytest.param(
        _steps({"name": "fetch", "agentRef": "a", "approval": {"approvers": {"users": ["u"]}}}),
        ["spec.steps[0]", "exactly one of agentRef"],
        id="step-with-agent-and-approval",
    ),
    pytest.param(
        _steps({"name": "gate", "approval": {"approvers": {"users": []}}}),
        ["spec.steps[0].approval.approvers", "at least one approver"],
        id="approval-without-approvers",
    ),
    pytest.param(
        _steps({"name": "gate", "approval": {"approvers": {"groups": ["g"]}, "timeout": "721h"}}),
        ["spec.steps[0].approval.timeout", "an approval may wait 720h at most"],
        id="approval-timeout-too-long",
    ),
    pytest.param(
        _steps(
            {
                "name": "gate",
                "approval": {"approvers": {"users": ["u"]}},
                "retry": {"maxAttempts": 2},
            }
        ),
        ["spec.steps[0].approval", "an approval step takes no retry"],
        id="approval-with-retry",
    ),
    pytest.param(_workflow(deadline="tomorrow"), ["spec.deadline"], id="bad-deadline"),
    pytest.param(
        _workflow(maxConcurrentRuns=-3),
        ["spec.maxConcurrentRuns", "greater than or equal to 1"],
        id="negative-max-concurrent-runs",
    ),
]


@pytest.mark.parametrize(("manifest", "expected"), INVALID)
def test_invalid_manifest_is_refused_naming_the_field(
    cluster: ClusterEndpoints,
    namespace: str,
    crds: None,
    manifest: dict[str, Any],
    expected: list[str],
) -> None:
    refusal = cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest), check=False
    )

    for fragment in expected:
        assert fragment in refusal, refusal
    kind = manifest["kind"].lower()
    assert not cluster.kubectl("get", kind, "-n", namespace, "-o", "name").strip()


def test_missing_trigger_is_refused(cluster: ClusterEndpoints, namespace: str, crds: None) -> None:
    manifest = _workflow()
    del manifest["spec"]["trigger"]

    refusal = cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest), check=False
    )

    assert "spec.trigger: Required value" in refusal


def test_valid_manifests_are_accepted_with_defaults_filled_in(
    cluster: ClusterEndpoints, namespace: str, crds: None
) -> None:
    for manifest in (agent("minimal"), _workflow()):
        cluster.kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))

    stored = json.loads(cluster.kubectl("get", "agent/minimal", "-n", namespace, "-o", "json"))
    spec = stored["spec"]
    assert spec["runtime"]["image"] == "troupe/runtime:0.1.0"
    assert spec["runtime"]["handler"] == {"type": "echo"}
    assert spec["messaging"] == {"maxInFlight": 1, "ackWait": "2m", "priorityLevels": 1}
    assert spec["retry"] == {"maxAttempts": 3}
    assert spec["deadLetter"] == {"enabled": True, "retention": "168h"}
    assert spec["deletionPolicy"] == "Delete"
    flow = json.loads(cluster.kubectl("get", "wf/pipeline", "-n", namespace, "-o", "json"))
    assert flow["spec"]["maxConcurrentRuns"] == 10
    assert flow["spec"]["steps"][1]["onFailure"] == "fail"


def test_an_approval_step_is_accepted_with_its_defaults(
    cluster: ClusterEndpoints, namespace: str, crds: None
) -> None:
    manifest = _steps(
        {"name": "build", "agentRef": "builder"},
        {"name": "gate", "dependsOn": ["build"], "approval": {"approvers": {"users": ["alice"]}}},
    )
    cluster.kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))

    stored = json.loads(cluster.kubectl("get", "wf/pipeline", "-n", namespace, "-o", "json"))
    gate = stored["spec"]["steps"][1]
    assert "agentRef" not in gate
    assert gate["approval"] == {
        "approvers": {"users": ["alice"]},
        "message": "",
        "onTimeout": "reject",
    }
    explained = cluster.kubectl("explain", "workflow.spec.steps.approval.onTimeout")
    assert "troupe:timeout" in explained
