"""Token counts: the provider's usage when it sends one, else about 4 characters a token."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from troupe_runtime.agent.llm.tokens import (
    completion_usage,
    estimate_message,
    estimate_tokens,
    message_chars,
    parse_usage,
)
from troupe_runtime.contract.model_provider import Pricing

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=25,
)
TEXT_MESSAGE = st.builds(
    lambda role, text: {"role": role, "content": text},
    st.sampled_from(["user", "assistant", "tool"]),
    st.text(max_size=400),
)


def test_four_characters_a_token_rounded_up() -> None:
    assert estimate_message({"role": "user", "content": "abcdefgh"}) == 2
    assert estimate_message({"role": "user", "content": "abcdefghi"}) == 3


def test_an_empty_message_counts_one_token() -> None:
    assert estimate_message({"role": "assistant", "content": None}) == 1


def test_tool_call_names_and_arguments_count() -> None:
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"function": {"name": "search", "arguments": '{"q": "x"}'}}],
    }
    assert message_chars(message) == len("search") + len('{"q": "x"}')


def test_content_parts_count_their_text() -> None:
    message = {"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image_url"}]}
    assert message_chars(message) == 4


@given(st.lists(TEXT_MESSAGE, max_size=20))
def test_estimate_is_a_quarter_of_the_characters_plus_at_most_one_per_message(
    messages: list[dict[str, Any]],
) -> None:
    chars = sum(len(m["content"]) for m in messages)
    estimate = estimate_tokens(messages)
    assert estimate >= len(messages)
    assert chars / 4 <= estimate <= chars / 4 + len(messages)


@given(st.lists(TEXT_MESSAGE, max_size=10), TEXT_MESSAGE)
def test_another_message_always_adds_tokens(
    messages: list[dict[str, Any]], extra: dict[str, Any]
) -> None:
    assert estimate_tokens([*messages, extra]) > estimate_tokens(messages)


@given(st.lists(JSON, max_size=8))
def test_any_shape_of_message_is_counted_without_a_crash(messages: list[Any]) -> None:
    assert estimate_tokens(messages) >= len(messages)


@given(JSON)
def test_usage_of_any_shape_is_two_counts_or_none(payload: Any) -> None:
    parsed = parse_usage(payload)
    assert parsed is None or all(isinstance(n, int) and n >= 0 for n in parsed)


@pytest.mark.parametrize(
    "payload",
    [
        None,
        {},
        {"prompt_tokens": 3},
        {"prompt_tokens": -1, "completion_tokens": 2},
        {"prompt_tokens": True, "completion_tokens": 2},
        {"prompt_tokens": 1.5, "completion_tokens": 2},
        {"prompt_tokens": 10**13, "completion_tokens": 2},
    ],
)
def test_implausible_usage_is_none(payload: Any) -> None:
    assert parse_usage(payload) is None


def test_reported_usage_is_priced_and_not_estimated() -> None:
    usage = completion_usage(
        {"prompt_tokens": 2_000, "completion_tokens": 1_000, "total_tokens": 3_000},
        [{"role": "user", "content": "hi"}],
        {"role": "assistant", "content": "hello"},
        Pricing(input_per_million=3.0, output_per_million=15.0),
    )
    assert (usage.tokens_in, usage.tokens_out, usage.estimated) == (2_000, 1_000, False)
    assert usage.cost_usd == pytest.approx(0.021)


@given(st.lists(TEXT_MESSAGE, min_size=1, max_size=5), TEXT_MESSAGE, JSON)
def test_missing_usage_is_estimated_and_priced(
    messages: list[dict[str, Any]], answer: dict[str, Any], reported: Any
) -> None:
    pricing = Pricing(input_per_million=1.0, output_per_million=2.0)
    usage = completion_usage(reported, messages, answer, pricing)
    if parse_usage(reported) is None:
        assert usage.estimated
        assert usage.tokens_in == estimate_tokens(messages)
        assert usage.tokens_out == estimate_message(answer)
    assert usage.cost_usd == pytest.approx(pricing.cost(usage.tokens_in, usage.tokens_out))
