"""What a workflow step's input expression must be for the engine to run it.

The engine evaluates each entry of a step's ``input`` (and of its compensation's) as
JMESPath (``troupe_runtime.workflow.mapping``); one that does not compile fails every run
at that step. The operator calls ``expression_problem`` first, so such a Workflow is
refused before any run starts, and the engine calls it when it starts.
"""

from __future__ import annotations

import warnings

import jmespath
from jmespath.exceptions import EmptyExpressionError, JMESPathError, LexerError, ParseError

MAX_QUOTED_CHARS = 120


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
