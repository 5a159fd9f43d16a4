"""The agent's contract as checks: JSON Schema validators for input and output data.

Validators are compiled once, when the runtime starts, so a broken schema in
the Agent stops the runtime at start-up instead of failing every message.
"""

from __future__ import annotations

from typing import Any

from jsonschema import SchemaError
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from troupe_runtime.contract.policies import Contract


class SchemaViolation(Exception):
    """Data does not match the contract; retrying cannot help."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def compile_schema(schema: dict[str, Any] | None, field: str) -> Validator | None:
    if schema is None:
        return None
    cls = validator_for(schema)
    try:
        cls.check_schema(schema)
    except SchemaError as error:
        raise ValueError(f"contract.{field} is not a valid JSON Schema: {error.message}") from error
    return cls(schema)


def _check(validator: Validator | None, data: Any, what: str) -> None:
    if validator is None:
        return
    error = best_match(validator.iter_errors(data))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        raise SchemaViolation(f"{what} violates the schema at {where}: {error.message}")


class ContractChecker:
    """Validates input and output data against the Agent's declared schemas."""

    def __init__(self, contract: Contract) -> None:
        self._input = compile_schema(contract.input_schema, "inputSchema")
        self._output = compile_schema(contract.output_schema, "outputSchema")

    def check_input(self, data: Any) -> None:
        _check(self._input, data, "input data")

    def check_output(self, data: Any) -> None:
        _check(self._output, data, "output data")
