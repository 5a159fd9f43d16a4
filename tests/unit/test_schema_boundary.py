"""Schema validation that cannot run away: linear-time patterns and uniqueness, bounded depth.

The catastrophic cases carry a pytest timeout far above what a linear check
needs and far below what Python's backtracking ``re`` would take (2^40 steps):
each asserts the outcome, and finishing at all is the point.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from troupe_runtime.agent.schemas import ContractChecker, SchemaViolation
from troupe_runtime.contract.policies import Contract

CATASTROPHIC = "^(a+)+$"
EVIL_TEXT = "a" * 40 + "!"


def checker(schema: dict[str, Any]) -> ContractChecker:
    return ContractChecker(Contract(input_schema=schema, output_schema=schema))


@pytest.mark.timeout(10)
def test_a_catastrophic_pattern_gives_its_verdict_at_once() -> None:
    check = checker({"properties": {"s": {"type": "string", "pattern": CATASTROPHIC}}})

    with pytest.raises(SchemaViolation, match=r"at s: .* does not match '\^\(a\+\)\+\$'"):
        check.check_input({"s": EVIL_TEXT})
    check.check_input({"s": "a" * 40})


@pytest.mark.timeout(10)
def test_a_catastrophic_pattern_property_gives_its_verdict_at_once() -> None:
    check = checker({"patternProperties": {CATASTROPHIC: {"type": "integer"}}})

    check.check_input({EVIL_TEXT: "not checked: the key does not match"})
    with pytest.raises(SchemaViolation, match=r"is not of type 'integer'"):
        check.check_input({"aaa": "x"})


@pytest.mark.timeout(10)
def test_additional_properties_beside_a_catastrophic_pattern_give_their_verdict_at_once() -> None:
    check = checker({"patternProperties": {CATASTROPHIC: {}}, "additionalProperties": False})

    with pytest.raises(SchemaViolation, match=r"does not match any of the regexes"):
        check.check_input({EVIL_TEXT: 1})


@pytest.mark.timeout(10)
def test_unique_items_over_many_objects_is_linear() -> None:
    check = checker({"uniqueItems": True})
    items = [{"n": n, "tags": [n, str(n)]} for n in range(10_000)]

    check.check_input(items)
    with pytest.raises(SchemaViolation, match="non-unique elements"):
        check.check_input([*items, {"tags": [0, "0"], "n": 0}])


def test_unique_items_keeps_json_equality() -> None:
    check = checker({"uniqueItems": True})

    check.check_input([1, True, 0, False, [1], [True]])
    with pytest.raises(SchemaViolation):
        check.check_input([1, 1.0])


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ({"pattern": "(?=a)b"}, r"pattern '\(\?=a\)b' is not supported"),
        ({"patternProperties": {r"(a)\1": {}}}, r"pattern .* is not supported"),
        (
            {"patternProperties": {"a": {}}, "unevaluatedProperties": False},
            "unevaluatedProperties together with patternProperties",
        ),
    ],
)
def test_a_schema_the_linear_engine_cannot_run_stops_the_runtime_at_start_up(
    schema: dict[str, Any], why: str
) -> None:
    with pytest.raises(ValueError, match=f"contract.inputSchema: {why}"):
        checker(schema)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ({"x": float("nan")}, r"output data holds nan, which JSON cannot carry .* at /x"),
        ([float("inf")], r"output data holds inf"),
        ({"s": {1}}, r"output data holds a set, which JSON cannot represent at /s"),
    ],
)
def test_an_output_json_cannot_carry_is_a_violation_with_or_without_a_schema(
    data: Any, why: str
) -> None:
    for check in (ContractChecker(Contract()), checker({"type": ["object", "array"]})):
        with pytest.raises(SchemaViolation, match=why):
            check.check_output(data)


def test_an_output_nested_too_deep_is_a_violation_not_a_recursion_error() -> None:
    deep: Any = "leaf"
    for _ in range(5000):
        deep = {"a": deep}
    check = checker({"$ref": "#/$defs/node", "$defs": {"node": {"properties": {"a": {}}}}})

    with pytest.raises(SchemaViolation, match="nests deeper than the limit of 64 levels"):
        check.check_output(deep)


def test_a_long_violation_is_shortened_for_its_dead_letter() -> None:
    with pytest.raises(SchemaViolation) as caught:
        checker({"type": "integer"}).check_input("x" * 100_000)

    assert len(caught.value.reason) < 1100
    assert caught.value.reason.endswith("characters)")


PATTERNS = ["^[a-z]+$", "b", r"^\d{2,3}$", "^(ab|cd)*$", "é", "^$"]
keys = st.text(alphabet="abcdé19", max_size=6)
instances = st.recursive(
    st.one_of(st.none(), st.integers(-3, 3), keys),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=10,
)
schemas = st.fixed_dictionaries(
    {},
    optional={
        "pattern": st.sampled_from(PATTERNS),
        "patternProperties": st.dictionaries(
            st.sampled_from(PATTERNS), st.just({"type": "integer"}), max_size=2
        ),
        "additionalProperties": st.sampled_from([True, False, {"type": "string"}]),
        "uniqueItems": st.booleans(),
        "items": st.just({"pattern": "^[a-z]*$"}),
        "propertyNames": st.just({"pattern": "^[a-c]*$"}),
    },
)


@settings(max_examples=200)
@given(schema=schemas, instance=instances)
def test_the_linear_keywords_agree_with_jsonschema(schema: dict[str, Any], instance: Any) -> None:
    expected = Draft202012Validator(schema).is_valid(instance)
    try:
        checker(schema).check_input(instance)
        valid = True
    except SchemaViolation:
        valid = False

    assert valid == expected
