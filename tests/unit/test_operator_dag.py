"""Workflow DAG checks the operator makes because CEL cannot: cycles and unknown agents."""

from __future__ import annotations

from troupe_operator.api import WorkflowSpec
from troupe_operator.builders.dag import find_cycles, unknown_agents, workflow_cycles


def test_an_acyclic_graph_has_no_cycles() -> None:
    assert (
        find_cycles({"fetch": [], "summarise": ["fetch"], "publish": ["summarise", "fetch"]}) == []
    )


def test_each_cycle_is_reported_with_its_steps_in_dependency_order() -> None:
    cycles = find_cycles({"a": ["c"], "b": ["a"], "c": ["b"], "d": ["a"], "x": ["y"], "y": ["x"]})

    assert sorted(map(sorted, cycles)) == [["a", "b", "c"], ["x", "y"]]
    (abc,) = [c for c in cycles if "a" in c]
    assert abc in (["a", "c", "b"], ["c", "b", "a"], ["b", "a", "c"])


def test_a_self_loop_is_a_cycle() -> None:
    assert find_cycles({"a": ["a"]}) == [["a"]]


def test_workflow_spec_cycles_and_unknown_agents() -> None:
    spec = WorkflowSpec.model_validate(
        {
            "trigger": {"subject": "research.start"},
            "steps": [
                {"name": "draft", "agentRef": "writer", "dependsOn": ["edit"]},
                {"name": "edit", "agentRef": "editor", "dependsOn": ["draft"]},
                {"name": "publish", "agentRef": "writer", "dependsOn": ["edit"]},
            ],
        }
    )

    assert sorted(workflow_cycles(spec)[0]) == ["draft", "edit"]
    assert unknown_agents(spec, {"editor"}) == {"writer": ["draft", "publish"]}


def test_a_compensation_naming_an_unknown_agent_is_reported_with_its_step() -> None:
    spec = WorkflowSpec.model_validate(
        {
            "trigger": {"subject": "shop.order"},
            "steps": [
                {
                    "name": "charge",
                    "agentRef": "payments",
                    "onFailure": "compensate",
                    "compensation": {"agentRef": "refunds"},
                }
            ],
        }
    )

    assert unknown_agents(spec, {"payments"}) == {"refunds": ["charge.compensation"]}
