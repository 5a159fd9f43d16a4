"""The first messages of a conversation: the system prompt, templated, and the user input.

The prompt is ``policy.systemPrompt.text`` or the mounted ConfigMap key
(``LlmRuntime.system_prompt_file``, read on every message, so an edited ConfigMap applies).
It may name ``{{ input }}`` (the input data as JSON), ``{{ input.<jmespath> }}`` (one value
of it: a string as is, anything else as JSON), ``{{ agent }}`` and ``{{ role }}``. Nothing
else is evaluated: a placeholder the template does not know stays as written, and the
substituted text is never scanned again, so hostile input never becomes a template, let
alone code.
"""

from __future__ import annotations

import json
import re
import warnings
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError

from troupe_runtime.agent.llm.types import Message
from troupe_runtime.contract.llm import LlmRuntime

PLACEHOLDER = re.compile(r"\{\{\s*(input(?:\.[^{}]*?)?|agent|role)\s*\}\}")


def as_text(value: Any) -> str:
    """A value for the model: a string as is, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _lookup(expression: str, data: Any) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            return as_text(jmespath.search(expression, data))
    except (JMESPathError, RecursionError, TypeError, ValueError):
        return "null"


def render(template: str, data: Any, *, agent: str, role: str) -> str:
    """``template`` with its placeholders replaced, in one pass (see the module's docstring)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "agent":
            return agent
        if name == "role":
            return role
        if name == "input":
            return as_text(data)
        return _lookup(name.removeprefix("input.").strip(), data)

    return PLACEHOLDER.sub(value, template)


def system_template(runtime: LlmRuntime) -> str | None:
    """The prompt's template as it is now: inline, or the mounted file."""
    prompt = runtime.policy.system_prompt
    if prompt is not None and prompt.text is not None:
        return prompt.text
    if runtime.system_prompt_file is not None:
        return runtime.system_prompt_file.read_text()
    return None


def opening(runtime: LlmRuntime, data: Any, *, agent: str, role: str) -> list[Message]:
    """The system prompt (when there is one) and the user message, from the input data."""
    messages: list[Message] = []
    template = system_template(runtime)
    if template is not None:
        messages.append(
            {"role": "system", "content": render(template, data, agent=agent, role=role)}
        )
    messages.append({"role": "user", "content": as_text(data)})
    return messages
