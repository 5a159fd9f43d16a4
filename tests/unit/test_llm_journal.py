"""The conversation journal's fold: replayed records to where the loop resumes (pure)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from troupe_runtime.agent.llm.journal import (
    DECIDED,
    DEFERRED,
    PARKED,
    TOOL_RESULT,
    TOOL_START,
    TURN,
    Record,
    resume,
    turn_record,
)
from troupe_runtime.agent.llm.types import Completion
from troupe_runtime.contract.usage import Usage

SYSTEM = {"role": "system", "content": "be brief"}
USER = {"role": "user", "content": "hi"}
ASKS = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ],
}


def turn(
    n: int,
    new: list[dict[str, Any]],
    answer: dict[str, Any],
    tokens_in: int = 0,
    tokens_out: int = 0,
) -> Record:
    usage = Usage(tokens_in=tokens_in, tokens_out=tokens_out)
    completion = Completion(answer, "stop", usage, "p", "m")
    return Record(f"turn-{n}", TURN, turn_record(n, new, completion, repair=False))


def tool(n: int, call: str, content: str) -> Record:
    message = {"role": "tool", "tool_call_id": call, "content": content}
    data = {"turn": n, "callId": call, "message": message}
    return Record(f"tool-{n}-{call}", TOOL_RESULT, data)


def test_nothing_replayed_is_a_fresh_conversation() -> None:
    state = resume([])
    assert state.fresh
    assert state.messages == []
    assert state.next_turn == 0


def test_turns_and_tool_results_rebuild_the_history_in_order() -> None:
    state = resume([turn(0, [SYSTEM, USER], ASKS, tokens_in=10, tokens_out=2), tool(0, "a", "A")])
    assert state.next_turn == 1
    assert state.opening == 2
    assert state.messages == [SYSTEM, USER, ASKS, state.completed["0-a"]]
    assert set(state.completed) == {"0-a"}
    assert state.last_answer == ASKS
    assert state.usage == Usage(tokens_in=10, tokens_out=2)


def test_a_started_call_without_a_result_is_remembered_as_started() -> None:
    start = Record("tool-start-0-b", TOOL_START, {"callId": "b", "turn": 0})
    state = resume([turn(0, [USER], ASKS), tool(0, "a", "A"), start])
    assert state.started == {"0-b"}
    finished = resume([turn(0, [USER], ASKS), start, tool(0, "b", "B")])
    assert finished.started == set()


def test_a_call_id_reused_on_a_later_turn_is_another_call() -> None:
    state = resume([turn(0, [USER], ASKS), tool(0, "a", "A"), tool(0, "b", "B")])
    again = resume([*_records(state_turns=2)])
    assert set(state.completed) == {"0-a", "0-b"}
    assert set(again.completed) == {"0-a", "1-a"}


def _records(state_turns: int) -> list[Record]:
    records: list[Record] = []
    for n in range(state_turns):
        records += [turn(n, [USER] if n == 0 else [], ASKS), tool(n, "a", f"A{n}")]
    return records


def test_a_record_seen_twice_counts_once() -> None:
    record = turn(0, [USER], ASKS, tokens_in=5)
    state = resume([record, record, tool(0, "a", "A"), tool(0, "a", "A")])
    assert state.next_turn == 1
    assert state.usage.tokens_in == 5
    assert len(state.messages) == 3


def test_a_turn_out_of_sequence_is_skipped() -> None:
    state = resume([turn(1, [USER], ASKS)])
    assert state.fresh


def test_deferrals_are_counted() -> None:
    records = [Record(f"deferred-{k}", DEFERRED, {"deferral": k}) for k in range(3)]
    assert resume(records).deferrals == 3


JOURNAL_KEYS = (
    "turn", "new", "answer", "callId", "message", "usage", "approval", "tool", "headers",
    "payload", "approved", "phase", "decidedBy", "decidedAt", "reason",
)  # fmt: skip


@given(
    st.lists(
        st.builds(
            Record,
            id=st.text(max_size=8),
            type=st.sampled_from(
                [TURN, TOOL_START, TOOL_RESULT, DEFERRED, PARKED, DECIDED, "other"]
            ),
            data=st.recursive(
                st.none() | st.integers() | st.text(max_size=5),
                lambda inner: (
                    st.lists(inner, max_size=3)
                    | st.dictionaries(
                        st.sampled_from(JOURNAL_KEYS),
                        inner,
                        max_size=4,
                    )
                ),
                max_leaves=10,
            ),
        ),
        max_size=10,
    )
)
def test_any_journal_content_folds_without_crashing(records: list[Record]) -> None:
    state = resume(records)
    assert state.next_turn >= 0
    assert all(isinstance(message, dict) for message in state.messages)
