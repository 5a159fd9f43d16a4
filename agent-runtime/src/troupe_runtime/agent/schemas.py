"""The agent's contract as checks: JSON Schema validators for input and output data.

Validators are compiled once, when the runtime starts, so a broken schema in
the Agent stops the runtime at start-up instead of failing every message.

Validation cannot run away, because everything in it is linear in the data:

- ``pattern``, ``patternProperties`` and ``additionalProperties`` match with
  RE2 (``google-re2``), a regex engine whose matching time is linear in the
  input for any pattern, so a catastrophic pattern such as ``^(a+)+$`` cannot
  hold the event loop (Python's ``re``, which jsonschema uses, backtracks
  exponentially). We chose a linear engine over a time budget: a budget still
  burns its whole allowance on every message, needs a thread or a process to
  enforce (``re`` holds the GIL), and fails messages that are merely unlucky.
  The price is RE2's syntax, a subset of ECMA-262 without lookaround or
  backreferences: a schema using those is refused at start-up, with the pattern
  named. ``unevaluatedProperties`` beside ``patternProperties`` is refused too,
  since jsonschema matches those patterns with ``re`` internally. What a schema
  must be is judged in ``contract.schema_rules``, which the operator calls too;
- ``$ref`` resolves within the schema and to the metaschemas only: validating a
  message never waits on the network (``contract.schema_rules`` says why);
- ``uniqueItems`` compares hashable forms of the items (linear) instead of
  jsonschema's pairwise fallback (quadratic in the array for objects);
- the data is at most ``limits.MAX_JSON_DEPTH`` deep (the envelope refuses
  deeper input, ``check_output`` deeper output), so the validator's recursion is
  bounded too; a ``RecursionError`` all the same is a violation, not a crash.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

from jsonschema import ValidationError
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from jsonschema.validators import extend

from troupe_runtime.contract.envelope import SchemaViolation, json_problem
from troupe_runtime.contract.policies import Contract
from troupe_runtime.contract.schema_rules import (
    OFFLINE_REGISTRY,
    compile_pattern,
    dialect,
    schema_problem,
)

__all__ = ["ContractChecker", "SchemaViolation", "compile_schema"]

# A violation's text goes into a dead letter's header: the gist, not a megabyte of repr.
MAX_REASON_CHARS = 1000


def _search(pattern: str, text: str) -> bool:
    """Whether ``pattern`` matches somewhere in ``text``, in time linear in ``text``."""
    try:
        return compile_pattern(pattern).search(text) is not None
    except UnicodeEncodeError:  # a lone surrogate, from a JSON "\ud800" escape
        safe = text.encode("utf-8", "replace").decode("utf-8")
        return compile_pattern(pattern).search(safe) is not None


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: Mapping[str, Any], instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional(instance: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    return [
        key
        for key in instance
        if key not in properties and not any(_search(pattern, key) for pattern in patterns)
    ]


def _additional_properties(
    validator: Any, allowed: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    extras = _additional(instance, schema)
    if validator.is_type(allowed, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], allowed, path=extra)
    elif not allowed and extras:
        listed = ", ".join(repr(extra) for extra in sorted(extras))
        if "patternProperties" in schema:
            verb = "does" if len(extras) == 1 else "do"
            patterns = ", ".join(repr(each) for each in sorted(schema["patternProperties"]))
            yield ValidationError(f"{listed} {verb} not match any of the regexes: {patterns}")
        else:
            verb = "was" if len(extras) == 1 else "were"
            yield ValidationError(
                f"Additional properties are not allowed ({listed} {verb} unexpected)"
            )


def _hashable(value: Any) -> Any:
    """A hashable form in which equal JSON values are equal (and ``true`` is not ``1``)."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, dict):
        return ("object", frozenset((key, _hashable(item)) for key, item in value.items()))
    if isinstance(value, list | tuple):
        return ("array", tuple(_hashable(item) for item in value))
    return ("value", value)


def _unique_items(
    validator: Any, unique: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not unique or not validator.is_type(instance, "array"):
        return
    if len({_hashable(item) for item in instance}) != len(instance):
        yield ValidationError("the array has non-unique elements")


_LINEAR_KEYWORDS = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "uniqueItems": _unique_items,
}


@functools.cache
def _linear(cls: Any) -> Any:
    """``cls`` with the linear-time keywords in place of jsonschema's own."""
    keywords = {name: check for name, check in _LINEAR_KEYWORDS.items() if name in cls.VALIDATORS}
    return extend(cls, validators=keywords)  # type: ignore[no-untyped-call]


def compile_schema(schema: dict[str, Any] | None, field: str) -> Validator | None:
    """A validator for ``schema``; raises ``ValueError`` naming the problem, if it has one."""
    if schema is None:
        return None
    if (problem := schema_problem(schema)) is not None:
        raise ValueError(f"contract.{field}: {problem.sentence()}")
    cls = dialect(schema)
    assert cls is not None, "schema_problem refuses an unknown dialect"
    validator: Validator = _linear(cls)(schema, registry=OFFLINE_REGISTRY)
    return validator


def _shortened(text: str) -> str:
    if len(text) <= MAX_REASON_CHARS:
        return text
    return f"{text[:MAX_REASON_CHARS]}... ({len(text)} characters)"


def _check(validator: Validator | None, data: Any, what: str) -> None:
    if validator is None:
        return
    try:
        error = best_match(validator.iter_errors(data))
    except RecursionError:
        raise SchemaViolation(f"{what} nests too deep to validate against the schema") from None
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        raise SchemaViolation(_shortened(f"{what} violates the schema at {where}: {error.message}"))


class ContractChecker:
    """Validates input and output data against the Agent's declared schemas."""

    def __init__(self, contract: Contract) -> None:
        self._input = compile_schema(contract.input_schema, "inputSchema")
        self._output = compile_schema(contract.output_schema, "outputSchema")

    def check_input(self, data: Any) -> None:
        _check(self._input, data, "input data")

    def check_output(self, data: Any) -> None:
        """The schema's verdict, after the format's: JSON outputs carry no NaN, nothing too deep."""
        if not isinstance(data, bytes | str) and (problem := json_problem(data)) is not None:
            raise SchemaViolation(f"output data {problem}")
        _check(self._output, data, "output data")
