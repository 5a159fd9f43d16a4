"""What only the operator can judge: schemas, input expressions and config size (pure).

Each judgement is the runtime's own, so the properties check both sides at once: the
runtime (or engine) starts on every spec with no problem, and refuses every spec with one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import re2  # type: ignore[import-untyped]
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jsonschema.validators import Draft202012Validator

from troupe_operator.api import AgentSpec, WorkflowSpec
from troupe_operator.builders import pods, validation, workload
from troupe_operator.builders.pods import Owner
from troupe_operator.builders.problems import Problem
from troupe_runtime.agent.schemas import ContractChecker
from troupe_runtime.contract.expressions import expression_problem
from troupe_runtime.contract.schema_rules import MAX_SCHEMA_DEPTH

OWNER = Owner("research", "summariser", uid="u-1")


def _agent(input_schema: Any = None, output_schema: Any = None) -> AgentSpec:
    contract = {
        key: value
        for key, value in (("inputSchema", input_schema), ("outputSchema", output_schema))
        if value is not None
    }
    return AgentSpec.model_validate({"role": "judge", "contract": contract})


def _workflow(steps: list[dict[str, Any]]) -> WorkflowSpec:
    return WorkflowSpec.model_validate({"trigger": {"subject": "orders.placed"}, "steps": steps})


def _only(problems: list[Problem]) -> Problem:
    (problem,) = problems
    return problem


def test_a_valid_schema_is_no_problem() -> None:
    schema = {
        "type": "object",
        "required": ["text"],
        "properties": {
            "text": {"type": "string", "pattern": r"^\p{L}[\w ]*$", "maxLength": 100},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}},
        },
        "$defs": {"tag": {"type": "string", "enum": ["a", "b"]}},
    }

    assert validation.agent_problems(_agent(schema, schema)) == []


@pytest.mark.parametrize(
    ("schema", "pointer", "why"),
    [
        ({"type": "strin"}, "/type", "not a valid JSON Schema"),
        ({"properties": {"n": {"minimum": "zero"}}}, "/properties/n/minimum", "not a valid"),
        (
            {"properties": {"code": {"type": "string", "pattern": "(?<=a)b"}}},
            "/properties/code/pattern",
            "pattern '(?<=a)b' is not supported",
        ),
        (
            {"patternProperties": {r"(a)\1": {}}},
            "/patternProperties/(a)\\1",
            "is not supported",
        ),
        (
            {"properties": {"a/b": {"pattern": "(?=x)"}}},
            "/properties/a~1b/pattern",
            "not supported",
        ),
        (
            {"patternProperties": {"a": {}}, "unevaluatedProperties": False},
            "/unevaluatedProperties",
            "unevaluatedProperties together with patternProperties",
        ),
        (
            {"properties": {"x": {"$ref": "#/$defs/missing"}}, "$defs": {}},
            "/properties/x/$ref",
            "$ref '#/$defs/missing' does not resolve",
        ),
        (
            {"items": {"$ref": "https://schemas.example/item.json"}},
            "/items/$ref",
            "fetches nothing over the network",
        ),
        ({"$schema": "https://example.com/my-dialect"}, "/$schema", "not a JSON Schema dialect"),
        ({"$schema": {"not": "a string"}}, "/$schema", "not a JSON Schema dialect"),
    ],
)
def test_a_schema_the_runtime_cannot_run_is_an_invalid_schema_naming_the_place(
    schema: dict[str, Any], pointer: str, why: str
) -> None:
    problem = _only(validation.agent_problems(_agent(input_schema=schema)))

    assert (problem.field, problem.reason) == ("spec.contract.inputSchema", "InvalidSchema")
    assert why in problem.message
    assert problem.message.endswith(f"(at {pointer})")


def test_the_output_schema_is_judged_and_named_too() -> None:
    problem = _only(validation.agent_problems(_agent(output_schema={"required": "text"})))

    assert problem.field == "spec.contract.outputSchema"


def test_references_resolve_against_ids_anchors_and_the_metaschemas() -> None:
    schema = {
        "$id": "https://schemas.example/order.json",
        "$defs": {
            "line": {"$id": "line.json", "$defs": {"qty": {"type": "integer"}}},
            "named": {"$anchor": "name", "type": "string"},
        },
        "properties": {
            "qty": {"$ref": "line.json#/$defs/qty"},
            "name": {"$ref": "#name"},
            "meta": {"$ref": "https://json-schema.org/draft/2020-12/schema"},
            "self": {"$ref": "#"},
        },
    }

    assert validation.agent_problems(_agent(schema)) == []


def test_a_draft_7_schema_is_judged_by_its_own_metaschema() -> None:
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": {"n": {"type": "integer"}},
        "properties": {"n": {"$ref": "#/definitions/n"}, "m": {"$ref": "#/definitions/m"}},
    }

    problem = _only(validation.agent_problems(_agent(schema)))

    assert problem.message.endswith("(at /properties/m/$ref)")


def _nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels - 1):
        schema = {"items": schema}
    return schema


def test_a_schema_nests_at_most_the_fixed_depth_whatever_the_stack() -> None:
    assert validation.agent_problems(_agent(_nested(MAX_SCHEMA_DEPTH))) == []
    problem = _only(validation.agent_problems(_agent(_nested(MAX_SCHEMA_DEPTH + 1))))
    assert problem.message.startswith(f"nests deeper than {MAX_SCHEMA_DEPTH} levels")
    assert _runtime_refuses(_agent(_nested(MAX_SCHEMA_DEPTH + 1)))


def test_a_schema_nested_thousands_deep_is_a_problem_not_a_crash() -> None:
    problem = _only(validation.agent_problems(_agent(_nested(3000))))

    assert "nests deeper" in problem.message


def test_a_long_metaschema_complaint_is_shortened() -> None:
    schema = {"enum": "x" * 10_000}

    problem = _only(validation.agent_problems(_agent(schema)))

    assert len(problem.message) < 600


# Schemas built from pieces the runtime may or may not run: valid and invalid keywords,
# RE2-compatible and -incompatible patterns, references that resolve and that do not.
_PATTERNS = st.sampled_from(["^a+$", r"\d{3}", r"^\p{L}+$", "(?=a)", r"(a)\1", "[", "(?i)x", ""])
_REFS = st.sampled_from(["#", "#/$defs/known", "#/$defs/unknown", "other.json", "#/properties"])
_LEAVES = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "object", "strin"])}),
    st.fixed_dictionaries({"pattern": _PATTERNS}),
    st.fixed_dictionaries({"$ref": _REFS}),
    st.fixed_dictionaries({"minimum": st.one_of(st.integers(), st.just("zero"))}),
    st.fixed_dictionaries({"enum": st.lists(st.integers(), max_size=3)}),
    st.just({}),
)
SCHEMAS = st.recursive(
    _LEAVES,
    lambda children: st.one_of(
        st.fixed_dictionaries(
            {"properties": st.dictionaries(st.sampled_from(["a", "b/c", "~d"]), children)}
        ),
        st.fixed_dictionaries({"items": children}),
        st.fixed_dictionaries({"anyOf": st.lists(children, min_size=1, max_size=3)}),
        st.fixed_dictionaries({"patternProperties": st.dictionaries(_PATTERNS, children)}),
        st.fixed_dictionaries({"$defs": st.fixed_dictionaries({"known": children})}),
    ),
    max_leaves=8,
)


def _runtime_refuses(spec: AgentSpec) -> bool:
    try:
        ContractChecker(spec.contract)
    except ValueError:
        return True
    return False


@settings(max_examples=150, deadline=None)
@given(SCHEMAS)
def test_the_runtime_starts_on_every_schema_with_no_problem_and_refuses_every_other(
    schema: dict[str, Any],
) -> None:
    spec = _agent(input_schema=schema)

    problems = validation.agent_problems(spec)

    assert bool(problems) == _runtime_refuses(spec)
    assert all(p.reason == "InvalidSchema" for p in problems)


def _patterns(schema: Any) -> list[str]:
    if isinstance(schema, dict):
        found = [schema["pattern"]] if isinstance(schema.get("pattern"), str) else []
        found += list(schema.get("patternProperties", {}))
        return found + [p for value in schema.values() for p in _patterns(value)]
    if isinstance(schema, list):
        return [p for value in schema for p in _patterns(value)]
    return []


def _re2_compiles(pattern: str) -> bool:
    try:
        re2.compile(pattern)
    except re2.error:
        return False
    return True


@settings(max_examples=150, deadline=None)
@given(SCHEMAS)
def test_any_schema_the_metaschema_accepts_whose_patterns_re2_compiles_is_no_problem(
    schema: dict[str, Any],
) -> None:
    assume("$ref" not in json.dumps(schema) and "unevaluated" not in json.dumps(schema))
    assume(Draft202012Validator(Draft202012Validator.META_SCHEMA).is_valid(schema))
    assume(all(_re2_compiles(pattern) for pattern in _patterns(schema)))
    assume(Draft202012Validator.FORMAT_CHECKER is not None)

    assert validation.agent_problems(_agent(schema)) == []


# Workflows: JMESPath input expressions.


def test_an_invalid_jmespath_expression_is_named_by_step_and_input_key() -> None:
    spec = _workflow(
        [
            {"name": "fetch", "agentRef": "fetcher", "input": {"url": "trigger.url"}},
            {
                "name": "sum",
                "agentRef": "adder",
                "dependsOn": ["fetch"],
                "input": {"total": "steps.fetch.output.[", "ok": "length(steps.fetch.output)"},
            },
        ]
    )

    problem = _only(validation.workflow_problems(spec))

    assert (problem.field, problem.reason) == ("spec.steps[1].input.total", "InvalidExpression")
    assert "'steps.fetch.output.[' is not a valid JMESPath expression" in problem.message
    assert "\n" not in problem.message


def test_a_compensations_input_expressions_are_judged_too() -> None:
    spec = _workflow(
        [
            {
                "name": "charge",
                "agentRef": "payments",
                "onFailure": "compensate",
                "compensation": {"agentRef": "refunds", "input": {"charge": "a ||"}},
            }
        ]
    )

    problem = _only(validation.workflow_problems(spec))

    assert problem.field == "spec.steps[0].compensation.input.charge"


def test_a_valid_workflow_is_no_problem() -> None:
    spec = _workflow(
        [
            {"name": "a", "agentRef": "x", "input": {"items": "trigger.items[?qty > `0`].sku"}},
            {"name": "b", "agentRef": "y", "dependsOn": ["a"], "input": {"n": "`{}`"}},
        ]
    )

    assert validation.workflow_problems(spec) == []


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        st.text(alphabet="ab.[]|&*`'\"(){}?=<>!,:@ 0", max_size=12),
        st.sampled_from(["a.b", "a[0]", "a | b", "[a, b]", "{x: a}", "`1`", "'s'", "@", "a.["]),
    )
)
def test_an_expression_is_a_problem_exactly_when_the_engine_cannot_compile_it(
    expression: str,
) -> None:
    import warnings

    import jmespath
    from jmespath.exceptions import JMESPathError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        try:
            jmespath.compile(expression)
            compiles = True
        except JMESPathError:
            compiles = False

    assert (expression_problem(expression) is None) == compiles


# Config size.

_BIG = 1024 * 1024


def _schema_of_size(size: int) -> dict[str, Any]:
    return {"type": "object", "description": "x" * size}


def test_a_config_too_large_for_a_config_map_names_the_biggest_field_and_the_limit() -> None:
    spec = _agent(input_schema=_schema_of_size(_BIG // 4), output_schema=_schema_of_size(_BIG))

    problem = _only(validation.agent_problems(spec))

    assert (problem.field, problem.reason) == ("spec.contract.outputSchema", "ConfigTooLarge")
    assert str(pods.CONFIG_MAP_LIMIT_BYTES) in problem.message
    assert str(pods.CONFIG_BUDGET_BYTES) in problem.message


def test_a_200_kb_schema_is_no_problem() -> None:
    assert validation.agent_problems(_agent(_schema_of_size(200 * 1024))) == []


def test_a_workflow_too_large_names_the_step_input_responsible() -> None:
    long_expression = "trigger." + "a" * (_BIG // 2)
    spec = _workflow(
        [
            {"name": "a", "agentRef": "x", "input": {"small": "trigger"}},
            {"name": "b", "agentRef": "y", "input": {"p": long_expression, "q": long_expression}},
        ]
    )

    problem = _only(validation.workflow_problems(spec))

    assert (problem.field, problem.reason) == ("spec.steps[1].input", "ConfigTooLarge")


@settings(max_examples=25, deadline=None)
@given(
    size=st.integers(min_value=pods.CONFIG_BUDGET_BYTES - 2000, max_value=_BIG),
    namespace=st.text(alphabet="abc-", min_size=1, max_size=63),
    name=st.text(alphabet="xyz-", min_size=1, max_size=63),
    url=st.text(alphabet="nats:/.example-0123456789", min_size=1, max_size=1000),
)
def test_every_config_that_passes_fits_its_config_map_whatever_the_names_and_url(
    size: int, namespace: str, name: str, url: str
) -> None:
    spec = _agent(input_schema=_schema_of_size(size - 900))
    config = workload.build_runtime_config(Owner(namespace, name, uid="u"), spec, url)
    data = workload.build_config_map(Owner(namespace, name, uid="u"), config)["data"]

    stored = sum(len(key) + len(value.encode()) for key, value in data.items())
    if not validation.agent_problems(spec):
        assert stored <= pods.CONFIG_MAP_LIMIT_BYTES


def test_a_config_just_under_the_budget_passes_and_just_over_fails() -> None:
    def measured(size: int) -> int:
        spec = _agent(input_schema=_schema_of_size(size))
        return len(workload.build_runtime_config(validation.WORST_CASE_OWNER, spec, "").to_json())

    overhead = measured(0)
    fits = _agent(input_schema=_schema_of_size(pods.CONFIG_BUDGET_BYTES - overhead))
    over = _agent(input_schema=_schema_of_size(pods.CONFIG_BUDGET_BYTES - overhead + 1))

    assert validation.agent_problems(fits) == []
    assert _only(validation.agent_problems(over)).reason == "ConfigTooLarge"
