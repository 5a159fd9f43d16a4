"""Sessions, the pure part: the session id at the envelope, the cap ``fold`` enforces on every
write, the queue ``admit`` keeps for double texting, and the session's messages as the
model sees them."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from troupe_cli.errors import Refused
from troupe_cli.gateway import CallRequest
from troupe_runtime.agent.llm.sessions import history_messages, with_history
from troupe_runtime.agent.settle import DeadLetter, Policy, SessionRefused, decide
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.dead_letters import DeadLetterReason
from troupe_runtime.contract.envelope import CloudEvent, MalformedMessage
from troupe_runtime.contract.gateway import (
    DirectoryEntry,
    TaskRecord,
    call_message,
    caller_session,
)
from troupe_runtime.contract.sessions import (
    Exchange,
    SessionBusy,
    SessionHistory,
    SessionPolicy,
    SessionQueue,
    Slot,
    admit,
    bounded_summary,
    event_marker,
    fold,
    summarised,
)


def event_of(**extra: str) -> CloudEvent:
    return CloudEvent(id="e1", source="/t", type="t.input", **extra)  # type: ignore[arg-type]


def binary(sessionid: str) -> dict[str, str]:
    return {
        "ce-specversion": "1.0",
        "ce-id": "e1",
        "ce-source": "/t",
        "ce-type": "t.input",
        "ce-sessionid": envelope.percent_encode(sessionid),
    }


# -- the session id at the envelope ------------------------------------------------------


def test_a_session_id_travels_as_the_sessionid_extension_and_back() -> None:
    event = event_of(sessionid="ctx-1_a=")
    headers, payload = envelope.to_binary(event)
    assert headers["ce-sessionid"] == "ctx-1_a="
    assert envelope.parse(headers, payload).sessionid == "ctx-1_a="


@pytest.mark.parametrize(
    "hostile",
    ["", "a b", "a.b", "../etc", "x" * 201, "ctx\u00e9", "a\tb", "*", ">", "ctx%00"],
)
def test_a_hostile_session_id_is_a_malformed_message_naming_sessionid(hostile: str) -> None:
    with pytest.raises(MalformedMessage, match="sessionid"):
        envelope.parse(binary(hostile), b"")


@given(st.text(max_size=300))
def test_any_session_id_either_parses_to_itself_or_is_malformed(text: str) -> None:
    valid = re.fullmatch(envelope.SESSION_ID_PATTERN, text) is not None
    if not valid:
        with pytest.raises(MalformedMessage, match=r"sessionid|header"):
            envelope.parse(binary(text), b"")
        return
    assert envelope.parse(binary(text), b"").sessionid == text
    assert naming.session_history_key(text).startswith("history.")


def test_the_session_id_is_not_carried_on_to_follow_ups() -> None:
    event = event_of(sessionid="ctx")
    follow = event.follow_up(source="/a", type="t.output", data=1, index=0, scope="a")
    assert follow.sessionid is None


def test_keys_are_digests_so_any_session_id_is_one_token() -> None:
    assert naming.session_history_key("a") != naming.session_history_key("b")
    assert (
        naming.session_queue_key("a").split(".")[1] == naming.session_history_key("a").split(".")[1]
    )
    assert len(naming.session_history_key("x" * 200).split(".")) == 2


# -- the policy ----------------------------------------------------------------------------


def test_a_retention_under_a_minute_is_refused() -> None:
    with pytest.raises(ValidationError, match="at least 1m"):
        SessionPolicy.model_validate({"retention": "30s"})


def test_the_defaults_enqueue_and_trim() -> None:
    policy = SessionPolicy()
    assert (policy.double_texting, policy.overflow, policy.max_turns) == ("enqueue", "trim", 20)
    assert policy.retention == timedelta(days=7)


# -- the cap ------------------------------------------------------------------------------


def exchange(index: int, size: int = 10) -> Exchange:
    return Exchange(event=f"e{index}", user="u" * size, assistant="a" * size)


def test_past_max_turns_the_oldest_exchange_is_dropped() -> None:
    policy = SessionPolicy(max_turns=2)
    history = SessionHistory()
    for index in range(3):
        history, dropped = fold(history, exchange(index), policy)
    assert [turn.event for turn in history.turns] == ["e1", "e2"]
    assert [turn.event for turn in dropped] == ["e0"]


def test_a_redelivered_exchange_is_recorded_once() -> None:
    policy = SessionPolicy()
    once, _ = fold(SessionHistory(), exchange(0), policy)
    twice, dropped = fold(once, exchange(0), policy)
    assert twice is once
    assert dropped == ()


def test_an_exchange_larger_than_the_cap_alone_is_cut_to_fit() -> None:
    policy = SessionPolicy(max_bytes=1024)
    history, _ = fold(SessionHistory(), exchange(0, size=10_000), policy)
    assert len(history.encoded()) <= 1024
    assert history.turns[0].user.startswith("u")


def test_summarising_keeps_a_share_for_the_summary() -> None:
    policy = SessionPolicy(max_bytes=2048, overflow="summarize")
    history = SessionHistory()
    dropped: tuple[Exchange, ...] = ()
    for index in range(20):
        history, dropped = fold(history, exchange(index, size=100), policy)
        if dropped:
            history = summarised(history, "s" * 5000, policy)
    assert history.summary is not None
    assert history.summary.startswith("s")
    assert len(history.encoded()) <= 2048


texts = st.text(max_size=3000)
exchanges = st.builds(Exchange, event=st.uuids().map(str), user=texts, assistant=texts)
policies = st.builds(
    SessionPolicy,
    max_turns=st.integers(1, 30),
    max_bytes=st.integers(1024, 8192),
    overflow=st.sampled_from(["trim", "summarize"]),
)


@given(policies, st.lists(exchanges, max_size=25), st.text(max_size=5000))
def test_whatever_is_written_the_history_stays_within_its_cap(
    policy: SessionPolicy, written: list[Exchange], summary: str
) -> None:
    history = SessionHistory()
    for item in written:
        before = history.turns
        history, dropped = fold(history, item, policy)
        if dropped and policy.overflow == "summarize":
            history = summarised(history, summary, policy)
        assert len(history.turns) <= policy.max_turns
        assert len(history.encoded()) <= policy.max_bytes
        # the newest is always kept (maybe cut); what stays is a suffix of what was
        assert history.turns[-1].event == item.event
        kept = [turn.event for turn in history.turns[:-1]]
        assert kept == [turn.event for turn in before][len(before) - len(kept) :]
        assert [t.event for t in dropped] == [t.event for t in before][: len(dropped)]


@given(st.text(max_size=20_000), st.integers(1024, 65536))
def test_a_summary_fits_its_share_escaped(summary: str, max_bytes: int) -> None:
    policy = SessionPolicy(max_bytes=max_bytes, overflow="summarize")
    bounded = bounded_summary(summary, policy)
    assert summary.startswith(bounded)
    assert len(SessionHistory(summary=bounded).encoded()) <= max_bytes // 4


# -- the queue ----------------------------------------------------------------------------


def test_into_an_empty_queue_a_message_goes_first() -> None:
    queue = admit(SessionQueue(), "a", now=100.0, lease=10.0, policy="reject")
    assert queue.first("a")
    assert queue.slots[0].expires == 110.0


def test_reject_refuses_a_second_message_while_one_runs() -> None:
    running = admit(SessionQueue(), "a", 100.0, 10.0, "reject")
    with pytest.raises(SessionBusy, match="doubleTexting: reject"):
        admit(running, "b", 101.0, 10.0, "reject")


def test_enqueue_appends_in_arrival_order() -> None:
    queue = SessionQueue()
    for event in "abc":
        queue = admit(queue, event, 100.0, 10.0, "enqueue")
    assert [slot.event for slot in queue.slots] == ["a", "b", "c"]
    assert queue.slots[0].stop is None


@pytest.mark.parametrize("policy", ["interrupt", "rollback"])
def test_interrupt_and_rollback_mark_the_running_message(policy: str) -> None:
    queue = admit(SessionQueue(), "a", 100.0, 10.0, policy)  # type: ignore[arg-type]
    queue = admit(queue, "b", 101.0, 10.0, policy)  # type: ignore[arg-type]
    assert queue.slots[0].stop == policy
    assert queue.slots[1].stop is None


def test_a_crashed_replicas_slot_expires_so_the_session_is_not_wedged() -> None:
    stale = SessionQueue(slots=(Slot(event="a", expires=100.0),))
    queue = admit(stale, "b", now=100.5, lease=10.0, policy="reject")
    assert [slot.event for slot in queue.slots] == ["b"]


def test_a_redelivered_message_keeps_its_place_and_renews_it() -> None:
    queue = admit(SessionQueue(), "a", 100.0, 10.0, "enqueue")
    queue = admit(queue, "b", 101.0, 10.0, "enqueue")
    again = admit(queue, "a", 105.0, 10.0, "reject")
    assert [slot.event for slot in again.slots] == ["a", "b"]
    assert again.slots[0].expires == 115.0


@given(
    st.lists(st.tuples(st.sampled_from("abcdef"), st.floats(0, 100), st.booleans()), max_size=40),
    st.sampled_from(["reject", "enqueue", "interrupt", "rollback"]),
)
def test_the_queue_holds_each_message_once_and_only_live_ones(
    steps: list[tuple[str, float, bool]], policy: str
) -> None:
    queue = SessionQueue()
    now = 0.0
    for event, later, leaving in steps:
        now += later
        if leaving:
            queue = queue.without(event)
            continue
        try:
            queue = admit(queue, event, now, 10.0, policy)  # type: ignore[arg-type]
        except SessionBusy:
            assert policy == "reject"
            assert queue.live(now).slots
            continue
        events = [slot.event for slot in queue.slots]
        assert len(events) == len(set(events))
        assert all(slot.expires > now for slot in queue.slots)
        assert queue.slot(event) is not None


# -- what the model sees -----------------------------------------------------------------


def test_the_history_goes_between_the_system_prompt_and_the_input() -> None:
    history = SessionHistory(summary="earlier", turns=(exchange(0, 1),))
    opening = [{"role": "system", "content": "S"}, {"role": "user", "content": "now"}]
    assert [m["role"] for m in with_history(opening, history)] == [
        "system", "system", "user", "assistant", "user",
    ]  # fmt: skip
    assert with_history(opening[1:], history)[0]["content"].endswith("earlier")
    assert history_messages(SessionHistory()) == []


def test_a_session_refusal_is_dead_lettered_with_its_reason() -> None:
    outcome = SessionRefused(DeadLetterReason.SESSION_BUSY, "busy")
    assert decide(outcome, Policy(max_attempts=3)) == DeadLetter(
        DeadLetterReason.SESSION_BUSY, "busy"
    )


# -- who sets it ---------------------------------------------------------------------------


def record_of(context_id: str, caller: str = "alice") -> TaskRecord:
    return TaskRecord(
        task_id="t1",
        kind="Agent",
        name="a",
        context_id=context_id,
        caller=caller,
        created_at=datetime.now(UTC),
    )


ENTRY = DirectoryEntry(kind="Agent", namespace="ns", name="a", subject="troupe.ns.agents.a.0")


def session_of(record: TaskRecord) -> str | None:
    _, headers, payload = call_message(ENTRY, record)
    return envelope.parse(headers, payload).sessionid


def test_a_gateway_call_carries_its_callers_context_as_the_session() -> None:
    assert session_of(record_of("ctx-1")) == caller_session("alice", "ctx-1")
    assert session_of(record_of("ctx-1")) == session_of(record_of("ctx-1"))
    assert session_of(record_of("ctx-2")) != session_of(record_of("ctx-1"))


def test_two_callers_choosing_one_context_id_have_two_sessions() -> None:
    assert session_of(record_of("conv-1", "alice")) != session_of(record_of("conv-1", "mallory"))


@given(st.text(max_size=600), st.text(max_size=300))
def test_any_caller_and_context_make_a_valid_session_id(caller: str, context: str) -> None:
    assert re.fullmatch(envelope.SESSION_ID_PATTERN, caller_session(caller, context))


def test_troupe_call_session_is_the_contextid_parameter_and_is_checked() -> None:
    fields = {"gateway": "http://gw", "namespace": "ns", "kind": "agent", "name": "a", "data": 1}
    assert CallRequest(**fields, session="s-1").params()["contextId"] == "s-1"  # type: ignore[arg-type]
    assert "contextId" not in CallRequest(**fields).params()  # type: ignore[arg-type]
    with pytest.raises(Refused, match="session"):
        CallRequest(**fields, session="a b")  # type: ignore[arg-type]


@given(st.text(min_size=1, max_size=5000))
def test_any_event_id_is_a_fixed_size_marker_that_fits_an_exchange_and_a_slot(
    event_id: str,
) -> None:
    marker = event_marker(event_id)
    assert len(marker) == 32
    assert marker == event_marker(event_id)
    admit(SessionQueue(), marker, 0.0, 1.0, "enqueue")
    history, _ = fold(
        SessionHistory(), Exchange(event=marker, user="u", assistant="a"), SessionPolicy()
    )
    assert history.has(marker)
