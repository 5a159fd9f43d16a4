"""What the Agent and Workflow APIs share: the group, CEL rules and the base model."""

from __future__ import annotations

from typing import Any

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
