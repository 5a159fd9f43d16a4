"""What a workflow step's input expression must be for the engine to run it.

The engine evaluates each entry of a step's ``input`` (and of its compensation's) as
JMESPath (``troupe_runtime.workflow.mapping``); one that does not compile fails every run
at that step. The operator calls ``expression_problem`` first, so such a Workflow is
refused before any run starts, and the engine calls it when it starts.

An approval step's ``message`` is a template over the same context: text with ``{expr}``
placeholders, each a JMESPath expression (``{trigger.order.id}``,
``{steps.check.output.total}``), and ``{{``/``}}`` for literal braces. ``split_template``
parses it (the operator refuses a template it cannot parse, ``template_problem``); the
engine renders it when the step is reached (``workflow.mapping.render_template``).
"""

from __future__ import annotations

import warnings

import jmespath
from jmespath.exceptions import EmptyExpressionError, JMESPathError, LexerError, ParseError

MAX_QUOTED_CHARS = 120
MAX_PLACEHOLDERS = 32
_QUOTES = "'`\""


class TemplateError(ValueError):
    """A template with an unbalanced brace, an empty or invalid placeholder, or too many."""


class Placeholder(str):
    """One ``{expr}`` of a template: the expression, apart from literal text."""

    __slots__ = ()


def split_template(template: str) -> list[str | Placeholder]:
    """``template`` as literal text and ``Placeholder`` expressions, in order.

    Inside a placeholder, braces nest (a JMESPath multiselect hash ``{a: b}`` is one
    expression) and quoted literals may hold any brace; outside, ``{{`` and ``}}`` are
    literal braces and a lone ``}`` is an error."""
    parts: list[str | Placeholder] = []
    text: list[str] = []
    i = 0
    while i < len(template):
        char = template[i]
        if char in "{}" and template[i : i + 2] == char * 2:
            text.append(char)
            i += 2
            continue
        if char == "}":
            raise TemplateError(f"a lone '}}' at column {i} (write '}}}}' for a brace)")
        if char != "{":
            text.append(char)
            i += 1
            continue
        end = _placeholder_end(template, i)
        expression = template[i + 1 : end].strip()
        if not expression:
            raise TemplateError(f"an empty placeholder at column {i}")
        if text:
            parts.append("".join(text))
            text = []
        parts.append(Placeholder(expression))
        i = end + 1
    if text:
        parts.append("".join(text))
    if sum(isinstance(p, Placeholder) for p in parts) > MAX_PLACEHOLDERS:
        raise TemplateError(f"more than {MAX_PLACEHOLDERS} placeholders")
    return parts


def _placeholder_end(template: str, start: int) -> int:
    """The index of the ``}`` closing the placeholder opened at ``start``."""
    depth, quote, i = 0, "", start
    while i < len(template):
        char = template[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in _QUOTES:
            quote = char
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise TemplateError(f"the placeholder at column {start} is never closed")


def template_problem(template: str) -> str | None:
    """Why ``template`` cannot be rendered (a parse error, or a placeholder that is not
    JMESPath), or None."""
    try:
        parts = split_template(template)
    except TemplateError as error:
        return f"the template {_quoted(template)}: {error}"
    for part in parts:
        if isinstance(part, Placeholder) and (problem := expression_problem(part)):
            return f"a placeholder of the template: {problem}"
    return None


def expression_problem(expression: str) -> str | None:
    """Why ``expression`` is not JMESPath the engine can evaluate, or None.

    jmespath still accepts the deprecated ```foo``` string literals, with a warning; so
    does the engine, so they pass here too (the warning is silenced).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            jmespath.compile(expression)
    except JMESPathError as error:
        return f"{_quoted(expression)} is not a valid JMESPath expression: {_detail(error)}"
    except RecursionError:
        return f"{_quoted(expression)} nests too deep for the JMESPath parser"
    return None


def _quoted(expression: str) -> str:
    if len(expression) <= MAX_QUOTED_CHARS:
        return repr(expression)
    return f"{expression[:MAX_QUOTED_CHARS]!r}... ({len(expression)} characters)"


def _detail(error: JMESPathError) -> str:
    """One line: jmespath's own messages draw a caret under the expression on later lines."""
    if isinstance(error, EmptyExpressionError):
        return "it is empty"
    if isinstance(error, ParseError):
        return f"{error.msg} at column {error.lex_position}"
    if isinstance(error, LexerError):
        return f"{error.message} at column {error.lexer_position}"
    return str(error).splitlines()[0]
