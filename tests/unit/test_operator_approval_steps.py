"""Approval steps in the Workflow API: a step is an Agent's or a person's, exactly one; an
approval step has approvers and no agent, retry, timeout, input or compensation; the engine
config carries it without an agent; the DAG check asks no Agent for it; a message that is
not a template is a problem naming its field; existing Workflows validate as before."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from troupe_operator.api import WorkflowSpec
from troupe_operator.builders import budgets, dag, engine, validation
from troupe_operator.builders.pods import Owner
from troupe_runtime.contract import approvals
from troupe_runtime.contract.workflow_resources import build_workflow_resources

OWNER = Owner(namespace="ns", name="release", uid="u", kind="Workflow")


def _spec(*steps: dict[str, Any]) -> WorkflowSpec:
    return WorkflowSpec.model_validate({"steps": list(steps), "trigger": {"subject": "go"}})


def _gate(**approval: Any) -> dict[str, Any]:
    return {"name": "gate", "approval": {"approvers": {"users": ["alice"]}, **approval}}


def test_an_approval_step_needs_no_agent_and_becomes_an_engine_step_without_one() -> None:
    spec = _spec(
        {"name": "build", "agentRef": "builder"},
        {
            **_gate(message="ship {trigger.v}?", timeout="2h", onTimeout="approve"),
            "dependsOn": ["build"],
            "onFailure": "continue",
        },
    )
    assert dag.unknown_agents(spec, {"builder"}) == {}
    assert budgets.short_steps(spec, {}) == []
    config = engine.build_engine_config(OWNER, spec, "nats://n:4222")
    gate = config.step("gate")
    assert (gate.agent, gate.subject, gate.depends_on, gate.on_failure) == (
        "",
        "",
        ["build"],
        "continue",
    )
    assert gate.approval is not None
    assert gate.approval.approvers.users == ["alice"]
    assert (gate.approval.message, gate.approval.timeout, gate.approval.on_timeout) == (
        "ship {trigger.v}?",
        timedelta(hours=2),
        "approve",
    )
    resources = build_workflow_resources(config)
    assert resources.approvals is not None
    assert resources.approvals.bucket == "troupe_ns_approvals"


def test_an_approval_steps_timeout_defaults_to_a_day_and_its_verdict_to_reject() -> None:
    gate = engine.build_engine_config(OWNER, _spec(_gate()), "nats://n:4222").step("gate")
    assert gate.approval is not None
    assert (gate.approval.timeout, gate.approval.on_timeout) == (
        approvals.DEFAULT_TIMEOUT,
        "reject",
    )


def test_a_workflow_of_agents_only_is_unchanged_and_needs_no_approvals_bucket() -> None:
    spec = _spec({"name": "a", "agentRef": "x"})
    assert dag.unknown_agents(spec, set()) == {"x": ["a"]}
    config = engine.build_engine_config(OWNER, spec, "nats://n:4222")
    assert config.step("a").approval is None
    assert not config.has_approvals
    assert build_workflow_resources(config).approvals is None


@pytest.mark.parametrize(
    ("step", "fragment"),
    [
        ({"name": "s"}, "exactly one of agentRef"),
        ({**_gate(), "agentRef": "x"}, "exactly one of agentRef"),
        ({"name": "gate", "approval": {"approvers": {}}}, "at least one approver"),
        (_gate(timeout="721h"), "720h at most"),
        ({**_gate(), "retry": {"maxAttempts": 2}}, "takes no retry"),
        ({**_gate(), "timeout": "5m"}, "takes no retry"),
        ({**_gate(), "input": {"x": "trigger"}}, "takes no retry"),
        ({**_gate(), "onFailure": "compensate"}, "takes no retry"),
        (_gate(onTimeout="maybe"), "onTimeout"),
    ],
)
def test_a_step_that_is_neither_or_both_or_a_bad_approval_is_refused(
    step: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ValidationError, match=fragment):
        _spec(step)


def test_an_approval_message_that_is_not_a_template_is_a_problem_naming_it() -> None:
    [problem] = validation.workflow_problems(_spec(_gate(message="ship {trigger.v")))
    assert (problem.field, problem.reason) == ("spec.steps[0].approval.message", "InvalidTemplate")
    assert "never closed" in problem.message
    assert validation.workflow_problems(_spec(_gate(message="ship {trigger.v}"))) == []
