"""Step inputs, mapped from the trigger and earlier steps' outputs with JMESPath.

Each entry of a step's ``input`` is a JMESPath expression evaluated against
``{"trigger": <run input>, "steps": {<name>: {"output": ...}}}``. A step with
no mapping gets its single parent's output, a dict of its parents' outputs,
or, with no parents, the run's input: a linear chain needs no mapping at all.
"""

from __future__ import annotations

from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError


class MappingError(ValueError):
    """An input expression does not compile or evaluate; the message names it."""


def mapping_context(trigger: Any, outputs: dict[str, Any]) -> dict[str, Any]:
    return {"trigger": trigger, "steps": {name: {"output": out} for name, out in outputs.items()}}


def map_input(
    expressions: dict[str, str], depends_on: list[str], trigger: Any, outputs: dict[str, Any]
) -> Any:
    """The input of one step."""
    if not expressions:
        if not depends_on:
            return trigger
        if len(depends_on) == 1:
            return outputs.get(depends_on[0])
        return {name: outputs.get(name) for name in depends_on}
    context = mapping_context(trigger, outputs)
    mapped: dict[str, Any] = {}
    for field, expression in expressions.items():
        try:
            mapped[field] = jmespath.search(expression, context)
        except JMESPathError as error:
            raise MappingError(f"input.{field}: {expression!r}: {error}") from error
    return mapped
