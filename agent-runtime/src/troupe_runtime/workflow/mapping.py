"""Step inputs, mapped from the trigger and earlier steps' outputs with JMESPath.

Each entry of a step's ``input`` is a JMESPath expression evaluated against
``{"trigger": <run input>, "steps": {<name>: {"output": ...}}}``. A step with
no mapping gets its single parent's output, a dict of its parents' outputs,
or, with no parents, the run's input: a linear chain needs no mapping at all.
"""

from __future__ import annotations

import json
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError

from troupe_runtime.contract.expressions import Placeholder, TemplateError, split_template


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


def render_template(template: str, trigger: Any, outputs: dict[str, Any]) -> str:
    """An approval step's message: each ``{expr}`` of ``template`` evaluated over the run
    (``mapping_context``) and written in: a string as it is, null as nothing, anything else
    as compact JSON. A placeholder that fails to evaluate renders as ``<error: …>`` rather
    than failing the run: the message is for a person, who can still decide. Unbounded
    here; the caller cuts it (``approvals.bounded_text``)."""
    try:
        parts = split_template(template)
    except TemplateError as error:
        return f"<error: {error}>"
    context = mapping_context(trigger, outputs)
    rendered: list[str] = []
    for part in parts:
        if not isinstance(part, Placeholder):
            rendered.append(part)
            continue
        try:
            value = jmespath.search(part, context)
        except JMESPathError as error:
            rendered.append(f"<error: {str(error).splitlines()[0]}>")
            continue
        if value is None:
            continue
        rendered.append(
            value
            if isinstance(value, str)
            else json.dumps(value, separators=(",", ":"), default=str)
        )
    return "".join(rendered)
