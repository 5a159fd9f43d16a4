"""Token counts and cost of a completion: the provider's ``usage``, else an estimate.

Some servers send no ``usage`` (or a streamed answer without ``include_usage``). Troupe
then counts itself, roughly: **about 4 characters per token** over the messages'
text (contents, tool names and tool-call arguments), at least one token per message.
That is the usual rule of thumb for English with BPE tokenizers; it is an *estimate*,
marked ``Usage.estimated``, good for budgets and rate limits, not for invoices. No
tokenizer is loaded: it would cost more per call than the whole client.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from troupe_runtime.agent.llm.types import Message
from troupe_runtime.contract.model_provider import Pricing
from troupe_runtime.contract.usage import Usage

CHARS_PER_TOKEN = 4
MAX_REPORTED_TOKENS = 10**12
"""A provider's count above this is junk, not a count (and would overflow budgets)."""


def _text_chars(content: Any) -> int:
    """Characters of a message's content: a string, or a list of ``{"text": ...}`` parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def message_chars(message: Any) -> int:
    """The characters of one message a model reads or writes: content and tool calls."""
    if not isinstance(message, dict):
        return 0
    chars = _text_chars(message.get("content"))
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            for key in ("name", "arguments"):
                value = function.get(key)
                if isinstance(value, str):
                    chars += len(value)
    return chars


def estimate_message(message: Any) -> int:
    """Estimated tokens of one message: ``ceil(chars / 4)``, at least 1."""
    return max(1, -(-message_chars(message) // CHARS_PER_TOKEN))


def estimate_tokens(messages: Iterable[Any]) -> int:
    """Estimated tokens of ``messages`` (an estimate: see the module's docstring)."""
    return sum(estimate_message(message) for message in messages)


def parse_usage(payload: Any) -> tuple[int, int] | None:
    """``(prompt_tokens, completion_tokens)`` from an OpenAI ``usage`` object; None if absent
    or not two plausible counts."""
    if not isinstance(payload, dict):
        return None
    counts = payload.get("prompt_tokens"), payload.get("completion_tokens")
    if all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_REPORTED_TOKENS
        for n in counts
    ):
        return counts[0], counts[1]  # type: ignore[return-value]
    return None


def completion_usage(
    reported: Any, messages: Iterable[Any], answer: Message, pricing: Pricing | None
) -> Usage:
    """The usage of one completion: the reported counts, else estimated from the request's
    ``messages`` and the ``answer``; priced with ``pricing`` (None: free)."""
    counts = parse_usage(reported)
    estimated = counts is None
    if counts is None:
        counts = estimate_tokens(messages), estimate_message(answer)
    cost = pricing.cost(*counts) if pricing is not None else 0.0
    return Usage(tokens_in=counts[0], tokens_out=counts[1], cost_usd=cost, estimated=estimated)
