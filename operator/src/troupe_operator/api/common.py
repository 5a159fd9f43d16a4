"""What the Agent and Workflow APIs share: the group, CEL rules and the base model."""

from __future__ import annotations

from typing import Any

from troupe_runtime.contract import grammar
from troupe_runtime.contract.durations import CEL_KEY as CEL_KEY
from troupe_runtime.contract.policies import WireModel

GROUP = "troupe.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


def cel(*rules: dict[str, str]) -> dict[str, Any]:
    """``json_schema_extra`` carrying CEL rules; ``crdgen`` keeps them next to the field."""
    return {CEL_KEY: list(rules)}


def rule(expression: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry; ``field_path`` points the error at a field."""
    entry = {"rule": expression, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    return entry


def cel_list(values: tuple[str, ...] | list[str]) -> str:
    """A CEL list literal of strings."""
    return "[" + ", ".join(f"'{value}'" for value in values) + "]"


def unique_rule(key: str, message: str) -> dict[str, str]:
    """A list whose items' ``key`` fields are all different."""
    return rule(f"self.all(a, self.exists_one(b, b.{key} == a.{key}))", message)


RETRY_BACKOFF_RULE = rule(
    "!has(self.backoff) || size(self.backoff) <= self.maxAttempts",
    "backoff must not list more delays than maxAttempts",
    ".backoff",
)
"""Attached wherever a RetryPolicy is embedded: the contract model itself stays CEL-free."""


class ApiModel(WireModel):
    """Base of the operator's own API models: the runtime contract's wire conventions."""


def schema_problem(schema: dict[str, Any], value: Any, path: str = "") -> str | None:
    """Where ``value`` breaks ``schema`` (the OpenAPI subset pass-through objects declare:
    object, string, boolean, int-or-string, required, properties, pattern, maxLength), or None.

    A pass-through structure (a container, an env source) declares its schema once; the CRD
    carries it and the model checks it here, so the two cannot disagree.
    """
    where = path.lstrip(".") or "value"
    if schema.get("x-kubernetes-int-or-string") and isinstance(value, int):
        return None if value >= schema.get("minimum", value) else f"{where} may not be negative"
    kind = "string" if schema.get("x-kubernetes-int-or-string") else schema.get("type")
    if kind == "boolean":
        return None if isinstance(value, bool) else f"{where} must be true or false"
    if kind == "string":
        return _string_problem(schema, value, where)
    if not isinstance(value, dict):
        return f"{where} must be an object"
    properties: dict[str, Any] = schema.get("properties", {})
    missing = [name for name in schema.get("required", []) if name not in value]
    if missing:
        return f"{path}.{missing[0]} is required".lstrip(".")
    unknown = set(value) - set(properties)
    if unknown and not schema.get("x-kubernetes-preserve-unknown-fields"):
        return f"{path}.{sorted(unknown)[0]} is not a known field".lstrip(".")
    for name, child in properties.items():
        if name in value and (problem := schema_problem(child, value[name], f"{path}.{name}")):
            return problem
    return None


def _string_problem(schema: dict[str, Any], value: Any, where: str) -> str | None:
    if not isinstance(value, str):
        return f"{where} must be a string"
    if len(value) > schema.get("maxLength", len(value)):
        return f"{where} is longer than {schema['maxLength']}"
    if "pattern" in schema and not grammar.matches(schema["pattern"], value):
        return f"{where} must match {schema['pattern']}"
    return None
