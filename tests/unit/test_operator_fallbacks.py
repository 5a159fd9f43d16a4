"""Fallback agents in the Workflow API: what a step may name, how the engine config
resolves them, and that a missing one is reported (and waited for) like a missing
agentRef."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from troupe_operator.api import AgentSpec, WorkflowSpec
from troupe_operator.api.workflow import MAX_FALLBACKS
from troupe_operator.builders import budgets, dag, engine
from troupe_operator.builders.pods import Owner
from troupe_operator.reconcilers.workflow import waits_for
from troupe_runtime.contract import naming
from troupe_runtime.contract.engine_config import EngineConfig

OWNER = Owner(namespace="ns", name="pipeline", uid="u", kind="Workflow")


def _spec(**step: Any) -> WorkflowSpec:
    return WorkflowSpec.model_validate(
        {"trigger": {"subject": "go"}, "steps": [{"name": "s", "agentRef": "a", **step}]}
    )


def test_fallbacks_reach_the_engine_with_their_inboxes_and_priority_levels() -> None:
    config = engine.build_engine_config(
        OWNER, _spec(fallbacks=["b", "c"]), "nats://n:4222", {"a": 1, "b": 3}
    )
    step = config.step("s")
    assert [(f.agent, f.subject, f.priority_levels) for f in step.fallbacks] == [
        ("b", naming.inbox_subject("ns", "b", 0), 3),
        ("c", naming.inbox_subject("ns", "c", 0), 1),
    ]
    assert EngineConfig.model_validate_json(config.to_json()) == config


def test_a_step_without_fallbacks_keeps_the_engine_config_it_had() -> None:
    config = engine.build_engine_config(OWNER, _spec(), "nats://n:4222")
    assert "fallbacks" not in config.to_json()


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"fallbacks": ["a"]}, "must not name its own agentRef"),
        ({"fallbacks": ["b", "b"]}, "each fallback agent once"),
        ({"fallbacks": [f"f{i}" for i in range(MAX_FALLBACKS + 1)]}, "at most 8"),
        ({"fallbacks": ["B_"]}, "should match pattern"),
        (
            {"agentRef": None, "approval": {"approvers": {"users": ["u"]}}, "fallbacks": ["b"]},
            "approval step takes no fallbacks",
        ),
    ],
)
def test_the_model_refuses_fallbacks_that_cannot_work(step: dict[str, Any], message: str) -> None:
    raw = {"name": "s", "agentRef": "a", **step}
    if raw["agentRef"] is None:
        del raw["agentRef"]
    with pytest.raises(ValidationError, match=message):
        WorkflowSpec.model_validate({"trigger": {"subject": "go"}, "steps": [raw]})


@given(names=st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=5))
def test_the_model_accepts_exactly_the_lists_of_distinct_other_agents(names: list[str]) -> None:
    valid = "a" not in names and len(set(names)) == len(names)
    try:
        _spec(fallbacks=names)
    except ValidationError:
        assert not valid
    else:
        assert valid


def test_a_missing_fallback_is_reported_as_an_unknown_agent_of_the_step() -> None:
    spec = _spec(fallbacks=["b", "gone"])
    assert dag.unknown_agents(spec, {"a", "b"}) == {"gone": ["s.fallbacks"]}


def test_a_workflow_missing_a_fallback_waits_for_it() -> None:
    body = {
        "spec": {"steps": [{"name": "s", "agentRef": "a", "fallbacks": ["b"]}]},
        "status": {"conditions": [{"type": "AgentsFound", "status": "False"}]},
    }
    assert waits_for(body, "b")
    assert not waits_for(body, "c")


def test_a_fallback_whose_worst_case_outlasts_the_step_timeout_is_reported() -> None:
    slow = AgentSpec.model_validate(
        {
            "role": "r",
            "timeout": "30s",
            "messaging": {"ackWait": "1h"},
            "retry": {"maxAttempts": 3, "backoff": []},
        }
    )
    short = budgets.short_steps(_spec(timeout="1m", fallbacks=["b"]), {"b": slow})
    assert [(s.step, s.agent) for s in short] == [("s", "b")]
