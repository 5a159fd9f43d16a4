"""contract.tool_approvals: which tool calls wait for a person, and what the request says."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from troupe_runtime.contract.agent_resources import EVENT_LOG_MAX_AGE_SECONDS
from troupe_runtime.contract.approvals import MAX_MESSAGE_CHARS
from troupe_runtime.contract.llm_policy import LlmPolicy
from troupe_runtime.contract.tool_approvals import (
    MAX_TOOL_TIMEOUT,
    NEEDS_APPROVERS_MESSAGE,
    TOOL_NAMES_MESSAGE,
    ToolApproval,
    ToolApprovals,
    destructive,
    needs_approval,
    request_message,
)

ALICE = {"users": ["alice"]}


def approvals(**fields: Any) -> ToolApprovals:
    return ToolApprovals.model_validate(fields)


def test_by_default_no_call_waits() -> None:
    policy = LlmPolicy.model_validate({"model": {"provider": "p", "model": "m"}})
    assert not policy.approvals.guards("rm", destructive=True)


def test_a_rule_names_its_tool_and_the_default_covers_the_others() -> None:
    rules = approvals(
        default={"approval": "destructive", "approvers": ALICE},
        tools=[{"tool": "rm", "approval": "always", "approvers": ALICE}, {"tool": "ls"}],
    )
    assert rules.guards("rm", destructive=False)  # always, whatever the hints
    assert not rules.guards("ls", destructive=True)  # never, by its own rule
    assert rules.guards("mv", destructive=True)
    assert not rules.guards("cat", destructive=False)


@pytest.mark.parametrize(
    ("read_only", "destructive_hint", "expected"),
    [
        (None, None, True),  # MCP's defaults: not read-only, destructive
        (True, None, False),
        (True, True, False),  # read-only wins: destructiveHint means nothing then
        (False, None, True),
        (None, False, False),
        (False, True, True),
    ],
)
def test_mcp_annotations_follow_the_specs_defaults(
    read_only: bool | None, destructive_hint: bool | None, expected: bool
) -> None:
    assert destructive(read_only, destructive_hint) is expected


@given(
    mode=st.sampled_from(["never", "always", "destructive"]),
    is_destructive=st.booleans(),
)
def test_the_decision_is_the_mode_and_only_destructive_reads_the_hint(
    mode: str, is_destructive: bool
) -> None:
    rule = ToolApproval.model_validate({"approval": mode, "approvers": ALICE})
    expected = {"never": False, "always": True, "destructive": is_destructive}[mode]
    assert needs_approval(rule, destructive=is_destructive) is expected


def test_a_guarding_rule_without_approvers_is_refused() -> None:
    with pytest.raises(ValidationError, match=NEEDS_APPROVERS_MESSAGE):
        ToolApproval.model_validate({"approval": "always"})
    assert ToolApproval.model_validate({"approval": "never"}).approval == "never"


def test_two_rules_for_one_tool_are_refused() -> None:
    with pytest.raises(ValidationError, match=TOOL_NAMES_MESSAGE):
        approvals(tools=[{"tool": "rm"}, {"tool": "rm"}])


def test_a_timeout_past_six_days_is_refused() -> None:
    with pytest.raises(ValidationError, match="at most 6 days"):
        ToolApproval.model_validate({"timeout": "145h"})
    assert ToolApproval.model_validate({"timeout": "144h"}).timeout.days == 6


def test_a_call_never_waits_longer_than_the_event_log_keeps_its_conversation() -> None:
    kept = timedelta(seconds=EVENT_LOG_MAX_AGE_SECONDS)
    assert kept - timedelta(days=1) >= MAX_TOOL_TIMEOUT


def test_the_message_names_the_agent_the_tool_and_the_arguments() -> None:
    rule = ToolApproval.model_validate(
        {"message": "{agent} wants {tool}({arguments}); {unknown} stays", "approvers": ALICE}
    )
    text = request_message(rule, agent="ops", tool="rm", arguments={"path": "/"})
    assert text == 'ops wants rm({"path": "/"}); {unknown} stays'


@given(
    arguments=st.recursive(
        st.text() | st.integers(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=30,
    )
)
def test_the_message_is_bounded_and_printable_whatever_the_model_wrote(arguments: Any) -> None:
    rule = ToolApproval()
    text = request_message(rule, agent="a", tool="t", arguments=arguments)
    assert len(text) <= MAX_MESSAGE_CHARS
    assert text.isprintable()
    assert text.startswith("Agent a asks to call the tool t with ")


# costAbove: the estimate is the user's expression over the call's arguments.

REFUNDS = {"approval": "costAbove", "cost": "amount", "threshold": 100, "approvers": ALICE}


def test_a_call_costing_more_than_the_threshold_waits_and_a_cheaper_one_runs() -> None:
    rule = ToolApproval.model_validate(REFUNDS)
    assert not needs_approval(rule, destructive=True, arguments={"amount": 100})
    assert needs_approval(rule, destructive=False, arguments={"amount": 100.01})


def test_the_cost_may_be_any_jmespath_over_the_arguments() -> None:
    rule = ToolApproval.model_validate({**REFUNDS, "cost": "sum(items[].price)"})
    assert needs_approval(rule, destructive=False, arguments={"items": [{"price": 60}] * 2})
    assert not needs_approval(rule, destructive=False, arguments={"items": [{"price": 60}]})


@pytest.mark.parametrize(
    "arguments",
    [{}, {"amount": "5"}, {"amount": True}, {"amount": None}, {"amount": [1]}, "text", None],
)
def test_a_call_whose_cost_cannot_be_read_waits(arguments: Any) -> None:
    """The model writes the arguments: leaving the field out must not slip the guard."""
    rule = ToolApproval.model_validate(REFUNDS)
    assert needs_approval(rule, destructive=False, arguments=arguments)


def test_cost_above_needs_an_expression_and_a_threshold_that_parse() -> None:
    with pytest.raises(ValidationError, match="costAbove needs a cost expression"):
        ToolApproval.model_validate({"approval": "costAbove", "approvers": ALICE, "cost": "a"})
    with pytest.raises(ValidationError, match="not a valid JMESPath"):
        ToolApproval.model_validate({**REFUNDS, "cost": "amount[?"})
    with pytest.raises(ValidationError):
        ToolApproval.model_validate({**REFUNDS, "threshold": -1})


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)


@given(amount=JSON, threshold=st.floats(min_value=0, max_value=1e12))
def test_a_call_runs_unasked_only_when_its_cost_is_a_number_within_the_threshold(
    amount: Any, threshold: float
) -> None:
    rule = ToolApproval.model_validate({**REFUNDS, "threshold": threshold})
    waits = needs_approval(rule, destructive=False, arguments={"amount": amount})
    within = (
        isinstance(amount, int | float)
        and not isinstance(amount, bool)
        and amount == amount  # not NaN
        and amount <= threshold
    )
    assert waits is not within


def test_only_a_policy_with_a_rule_other_than_never_is_guarding() -> None:
    """An Agent whose policy guards nothing scans no approvals bucket."""
    assert not approvals().guarding
    assert not approvals(tools=[{"tool": "ls"}]).guarding
    assert approvals(tools=[{"tool": "rm", "approval": "always", "approvers": ALICE}]).guarding
    assert approvals(default={"approval": "destructive", "approvers": ALICE}).guarding
