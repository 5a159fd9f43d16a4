"""History bounds (pure): previews of offloaded results, and fitting the context window."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from troupe_runtime.agent.llm.history import fit, history_budget, preview
from troupe_runtime.agent.llm.tokens import estimate_message

Message = dict[str, Any]
SYSTEM: Message = {"role": "system", "content": "s" * 400}
USER: Message = {"role": "user", "content": "u" * 400}


def tool(content: str) -> Message:
    return {"role": "tool", "tool_call_id": "c", "content": content}


def asks() -> Message:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def total(messages: list[Message]) -> int:
    return sum(estimate_message(message) for message in messages)


def test_a_preview_keeps_the_start_and_names_the_object_within_the_limit() -> None:
    text = "é" * 10_000
    shown = preview(text, len(text.encode()), 1024, "bucket", "llm-x/tool-0-c")
    assert shown.startswith("é" * 100)
    assert "'llm-x/tool-0-c'" in shown
    assert "'bucket'" in shown
    assert len(shown.encode()) <= 1024


def test_a_history_within_budget_is_sent_unchanged() -> None:
    messages: list[Message] = [SYSTEM, USER, asks(), tool("small")]
    assert fit(messages, 10_000, protected=2) is messages


def test_the_oldest_tool_results_lose_their_bodies_first() -> None:
    messages: list[Message] = [SYSTEM, USER]
    for index in range(6):
        messages += [asks(), tool(str(index) * 2000)]
    fitted = fit(messages, total(messages) - 400, protected=2)  # one result too many
    assert fitted[:2] == [SYSTEM, USER]
    assert "elided" in fitted[3]["content"]
    assert fitted[-1] == messages[-1]
    assert fitted[5]["content"] == messages[5]["content"]
    assert messages[3]["content"] == "0" * 2000  # the journal's copy is untouched


@given(
    st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 300)), max_size=12),
    st.integers(0, 5000),
)
def test_fitting_never_touches_the_opening_or_the_last_turn(
    sizes: list[tuple[int, int]], budget: int
) -> None:
    messages: list[Message] = [SYSTEM, USER]
    for result, text in sizes:
        messages += [{"role": "assistant", "content": "a" * text}, tool("r" * result)]
    fitted = fit(messages, budget, protected=2)
    assert len(fitted) == len(messages)
    assert fitted[:2] == messages[:2]
    assert fitted[-2:] == messages[-2:]
    assert total(fitted) <= max(budget, total(messages[:2] + messages[-2:]) + 30 * len(messages))


def test_the_budget_keeps_room_for_the_answer() -> None:
    assert history_budget(8192, 1000) < 8192 - 1000
    assert history_budget(8192, None) < 8192 * 3 // 4
    assert history_budget(256, 10_000) > 0
