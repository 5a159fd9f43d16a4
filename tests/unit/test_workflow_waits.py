"""Which Workflows an Agent's pass wakes: those that last found it missing and name it."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from troupe_operator.reconcilers.workflow import waits_for


def _workflow(agent_refs: list[str], found: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": "w"},
        "spec": {"steps": [{"name": f"s{i}", "agentRef": a} for i, a in enumerate(agent_refs)]},
    }
    if found is not None:
        body["status"] = {
            "conditions": [{"type": "AgentsFound", "status": found, "reason": "AgentNotFound"}]
        }
    return body


def test_a_workflow_that_found_the_agent_missing_waits_for_it() -> None:
    assert waits_for(_workflow(["a", "b"], "False"), "b")


def test_a_workflow_that_found_its_agents_or_names_another_does_not_wait() -> None:
    assert not waits_for(_workflow(["a"], "True"), "a")
    assert not waits_for(_workflow(["a"], "False"), "b")
    assert not waits_for(_workflow(["a"], None), "a")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@given(st.dictionaries(st.sampled_from(["metadata", "spec", "status"]), _JSON), st.text(max_size=8))
def test_any_body_is_judged_without_raising(body: dict[str, Any], agent: str) -> None:
    """Bodies are read raw, before the models: a Workflow the models refuse must not break
    the pass of the Agent that wakes it."""
    assert waits_for(body, agent) in (True, False)
