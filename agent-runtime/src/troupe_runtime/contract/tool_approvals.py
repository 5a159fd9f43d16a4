"""Which tool calls of an LLM agent wait for a person (``spec.llm.approvals``).

A rule per tool, by name, and a ``default`` for every tool no rule names. ``approval``:

- ``never`` (the default): the call runs;
- ``always``: every call waits for a decision;
- ``destructive``: a call waits unless the tool says it is harmless. MCP's
  ``ToolAnnotations`` default ``readOnlyHint`` to false and ``destructiveHint`` to true
  ("may perform destructive updates"), so a tool waits unless its server marks it
  ``readOnlyHint: true`` or ``destructiveHint: false``. The same default holds for every
  tool that carries no annotations (Python functions, Agents and A2A agents called as
  tools): nothing says they are harmless. Annotations are the server's claims, not
  guarantees; following the spec's defaults errs on the side of asking.

- ``costAbove``: a call waits when its estimated cost exceeds ``threshold``. No tool
  declares what a call costs, and what an Agent called as a tool spends is known only once
  it has answered, so the estimate is the user's, from the call itself: ``cost``, a JMESPath
  expression over the call's arguments (``amount``, ``sum(items[].price)``…), in whatever unit
  the threshold is. A call whose cost cannot be read (the expression fails, or gives no
  number: the model left the field out, or wrote text) waits: the model writes the
  arguments, and a guard it can slip by omitting a field guards nothing. Model tokens are
  Budgets' to cap.

A guarded call's request names its ``approvers`` (who may decide, as Kubernetes users and
groups), a ``message`` templated with ``{agent}``, ``{tool}`` and ``{arguments}`` (literal
replacement, nothing else is evaluated), and a ``timeout`` after which ``onTimeout``
decides, within ``MAX_TOOL_TIMEOUT``. The round trip is ``contract.approvals``'s.
"""

from __future__ import annotations

import json
import math
import warnings
from datetime import timedelta
from typing import Any, Literal

import jmespath
from pydantic import Field, field_validator, model_validator

from troupe_runtime.contract.approvals import (
    DEFAULT_TIMEOUT,
    MAX_MESSAGE_CHARS,
    Approvers,
    OnTimeout,
    bounded_text,
)
from troupe_runtime.contract.durations import Duration
from troupe_runtime.contract.expressions import expression_problem
from troupe_runtime.contract.policies import WireModel

ApprovalMode = Literal["never", "always", "destructive", "costAbove"]
DEFAULT_MESSAGE = "Agent {agent} asks to call the tool {tool} with {arguments}."
MAX_RULES = 64
MAX_ARGUMENTS_CHARS = 2048
"""How much of a call's arguments its request's message quotes."""
NEEDS_APPROVERS_MESSAGE = "a tool approval other than never needs at least one approver"
NEEDS_COST_MESSAGE = "approval: costAbove needs a cost expression and a threshold"
MAX_COST_EXPRESSION_CHARS = 1024
TOOL_NAMES_MESSAGE = "spec.llm.approvals.tools names must be unique"
MAX_TOOL_TIMEOUT = timedelta(days=6)
"""The longest a tool call may wait: a day less than the namespace's event log keeps a record
(``agent_resources.EVENT_LOG_MAX_AGE_SECONDS``, seven days), since the parked message and the
conversation it resumes live in that log. Shorter than a Workflow step's ``MAX_TIMEOUT``."""
TIMEOUT_BOUND_MESSAGE = (
    f"a tool approval's timeout must be at most {MAX_TOOL_TIMEOUT.days} days: the conversation "
    "it resumes is kept in the event log for seven"
)


class ToolApproval(WireModel):
    """When calls of a tool wait for a person, who decides, and for how long."""

    approval: ApprovalMode = Field(
        default="never",
        description="never: the call runs (default); always: every call waits for a decision; "
        "destructive: a call waits unless the tool is marked readOnlyHint true or "
        "destructiveHint false (MCP's defaults: a tool with no annotations may be destructive); "
        "costAbove: a call waits when cost, evaluated over its arguments, exceeds threshold, "
        "or cannot be read as a number.",
    )
    cost: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_COST_EXPRESSION_CHARS,
        description="For costAbove: the call's estimated cost, a JMESPath expression over "
        "the tool call's arguments, such as amount or sum(items[].price).",
    )
    threshold: float | None = Field(
        default=None,
        ge=0,
        description="For costAbove: a call whose cost is above this waits for a decision.",
    )
    approvers: Approvers = Field(
        default_factory=Approvers,
        description="Who may decide: Kubernetes user names and groups (an Approval's "
        "admission policy admits a decision from them alone; RBAC on approvals must allow "
        "it too).",
    )
    message: str = Field(
        default=DEFAULT_MESSAGE,
        max_length=MAX_MESSAGE_CHARS,
        description="What the Approval says; {agent}, {tool} and {arguments} are replaced by "
        "the Agent's name, the tool's name and the call's arguments (JSON, cut to 2048 "
        f"characters). Default: {DEFAULT_MESSAGE}",
    )
    timeout: Duration = Field(
        default=DEFAULT_TIMEOUT,
        description="How long a call waits for a decision: a duration such as 30m or 4h, at "
        "most 144h (6 days: the conversation waits in the event log, which keeps it 7), and never "
        "past the message's deadline; default 24h.",
    )
    on_timeout: OnTimeout = Field(
        default="reject",
        description="What a call that waited its timeout out becomes: reject (the model reads "
        "that nobody approved it; default) or approve (it runs).",
    )

    @field_validator("timeout")
    @classmethod
    def _bounded_timeout(cls, value: timedelta) -> timedelta:
        if value > MAX_TOOL_TIMEOUT:
            raise ValueError(TIMEOUT_BOUND_MESSAGE)
        return value

    @field_validator("cost")
    @classmethod
    def _cost_parses(cls, value: str | None) -> str | None:
        if value is not None and (problem := expression_problem(value)):
            raise ValueError(f"cost: {problem}")
        return value

    @model_validator(mode="after")
    def _someone_decides(self) -> ToolApproval:
        if self.approval != "never" and not (self.approvers.users or self.approvers.groups):
            raise ValueError(NEEDS_APPROVERS_MESSAGE)
        if self.approval == "costAbove" and (self.cost is None or self.threshold is None):
            raise ValueError(NEEDS_COST_MESSAGE)
        return self


class ToolApprovalRule(ToolApproval):
    """The approval of one tool, by the name the model calls it by."""

    tool: str = Field(
        min_length=1, max_length=64, description="The tool's name, as the model sees it."
    )


class ToolApprovals(WireModel):
    """Tool-call approvals: a rule per tool and a default for the others."""

    default: ToolApproval = Field(
        default_factory=ToolApproval,
        description="The approval of every tool no rule names; default never.",
    )
    tools: list[ToolApprovalRule] = Field(
        default_factory=list,
        max_length=MAX_RULES,
        description="Rules for single tools, by name; names unique.",
    )

    @model_validator(mode="after")
    def _unique_tools(self) -> ToolApprovals:
        names = [rule.tool for rule in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(TOOL_NAMES_MESSAGE)
        return self

    @property
    def guarding(self) -> bool:
        """Whether any call can wait: False when every rule is ``never`` (the default), and
        the runtime then does no approvals I/O at all (no timeout scan)."""
        return any(r.approval != "never" for r in (self.default, *self.tools))

    def rule_for(self, tool: str) -> ToolApproval:
        """The rule that applies to calls of ``tool``."""
        return next((rule for rule in self.tools if rule.tool == tool), self.default)

    def guards(self, tool: str, *, destructive: bool, arguments: Any = None) -> bool:
        """Whether a call of ``tool`` with ``arguments`` (``destructive`` as its annotations
        say, MCP's default true) waits for a decision."""
        return needs_approval(self.rule_for(tool), destructive=destructive, arguments=arguments)


def needs_approval(rule: ToolApproval, *, destructive: bool, arguments: Any = None) -> bool:
    """Whether a call under ``rule`` with ``arguments`` waits for a person (pure)."""
    match rule.approval:
        case "never":
            return False
        case "always":
            return True
        case "destructive":
            return destructive
        case "costAbove":
            cost = estimated_cost(rule.cost, arguments)
            return cost is None or rule.threshold is None or cost > rule.threshold


def estimated_cost(expression: str | None, arguments: Any) -> float | None:
    """``expression`` over the call's ``arguments`` as a finite number, or None when it
    gives none (no expression, an evaluation error, a missing field, text, a boolean, NaN)."""
    if expression is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            value = jmespath.search(expression, arguments)
    except (jmespath.exceptions.JMESPathError, RecursionError, TypeError, ValueError):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float: certainly above any threshold
        return math.inf
    return number if not math.isnan(number) else None


def destructive(read_only_hint: bool | None, destructive_hint: bool | None) -> bool:
    """Whether MCP annotations leave a tool possibly destructive: the spec's defaults
    (``readOnlyHint`` false, ``destructiveHint`` true) for hints left unset."""
    return read_only_hint is not True and destructive_hint is not False


def request_message(rule: ToolApproval, *, agent: str, tool: str, arguments: Any) -> str:
    """The request's message: the template with its three names replaced, bounded and with
    control characters blanked (the arguments are the model's text)."""
    try:
        quoted = json.dumps(arguments, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError):
        quoted = str(arguments)
    quoted = quoted[:MAX_ARGUMENTS_CHARS]
    text = rule.message.replace("{agent}", agent).replace("{tool}", tool)
    text = text.replace("{arguments}", quoted)
    return bounded_text(text, MAX_MESSAGE_CHARS)
