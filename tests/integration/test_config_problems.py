"""What only the operator can judge, reported in status against the real API server.

A schema the runtime cannot run, an input expression that is not JMESPath, a config too
large for its ConfigMap: each is Ready=False and Stalled=True with the reason and the
field, instead of a pod crashing (or never starting) with the reason in its log.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.integration.operator_support import (
    OperatorProcess,
    agent,
    apply,
    condition,
    get,
    running_agent,
    wait_ready,
    workflow,
)
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for

DEADLINE = 45.0


def _stalled(
    cluster: ClusterEndpoints, namespace: str, kind: str, name: str, reason: str
) -> dict[str, Any]:
    """The Ready condition once the object stalls with ``reason`` (it must, by the deadline)."""

    def seen() -> dict[str, Any] | None:
        body = get(cluster, namespace, kind, name)
        ready, stalled = condition(body), condition(body, "Stalled")
        if ready is None or stalled is None:
            return None
        if (ready["status"], ready["reason"], stalled["status"]) != ("False", reason, "True"):
            return None
        return ready

    ready: dict[str, Any] = wait_for(seen, DEADLINE, f"{kind} {name} to stall with {reason}")
    return ready


def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(
    ("schema", "pointer"),
    [
        (
            {"properties": {"code": {"type": "string", "pattern": "(?<=a)b"}}},
            "/properties/code/pattern",
        ),
        ({"properties": {"x": {"$ref": "#/$defs/missing"}}}, "/properties/x/$ref"),
        ({"properties": {"n": {"type": "integr"}}}, "/properties/n/type"),
        # Deeper than pydantic can serialise: the plan must report it, not fail building.
        (_nested(300), "/properties/a/properties/a"),
    ],
)
def test_a_schema_the_runtime_cannot_run_stalls_naming_the_field_and_the_place(
    cluster: ClusterEndpoints,
    namespace: str,
    operator: OperatorProcess,
    schema: dict[str, Any],
    pointer: str,
) -> None:
    apply(cluster, namespace, agent("schemed", contract={"inputSchema": schema}))

    ready = _stalled(cluster, namespace, "agent", "schemed", "InvalidSchema")

    assert "spec.contract.inputSchema" in ready["message"]
    assert pointer in ready["message"]


def test_a_fixed_schema_makes_the_agent_ready(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    broken = {"properties": {"code": {"pattern": "(?=x)"}}}
    apply(cluster, namespace, agent("fixed", contract={"outputSchema": broken}))
    _stalled(cluster, namespace, "agent", "fixed", "InvalidSchema")

    apply(cluster, namespace, agent("fixed", contract={"outputSchema": {"type": "object"}}))

    wait_ready(cluster, namespace, "agent", "fixed")


def test_an_invalid_jmespath_input_stalls_the_workflow_naming_the_step_and_key(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("adder"))
    steps = [{"name": "sum", "agentRef": "adder", "input": {"total": "trigger.items[?"}}]
    apply(cluster, namespace, workflow("summing", steps))

    ready = _stalled(cluster, namespace, "workflow", "summing", "InvalidExpression")

    assert "spec.steps[0].input.total" in ready["message"]
    assert "trigger.items[?" in ready["message"]


def test_a_config_too_large_for_its_config_map_stalls_naming_the_field_and_the_limit(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    # One long string: server-side apply's managedFields list keys, not values, so the
    # object stays under etcd's 1.5 MiB request limit. Client-side apply would copy the
    # object into an annotation (256 KiB at most).
    huge = {"type": "object", "description": "x" * (1024 * 1024)}
    manifest = agent("huge", contract={"inputSchema": huge})
    cluster.kubectl(
        "apply", "--server-side", "-n", namespace, "-f", "-", stdin=json.dumps(manifest)
    )

    ready = _stalled(cluster, namespace, "agent", "huge", "ConfigTooLarge")

    assert "spec.contract.inputSchema" in ready["message"]
    assert "1048576" in ready["message"]
    cluster.kubectl("delete", "-n", namespace, "agent/huge", "--timeout=60s")


def test_a_config_the_runtime_refuses_at_start_up_is_in_status_in_its_own_words(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    # What the operator cannot see: the handler's code. The runtime logs one line and exits
    # 1; the pod's termination message is that line, and the status carries it.
    handler = {"type": "python", "entrypoint": "no_such_handlers_module:handle"}
    apply(cluster, namespace, running_agent("unloadable", runtime={"handler": handler}))

    ready = _stalled(cluster, namespace, "agent", "unloadable", "PodsCrashing")

    assert "invalid config, not starting" in ready["message"]
    assert "'no_such_handlers_module:handle' cannot be imported" in ready["message"]
