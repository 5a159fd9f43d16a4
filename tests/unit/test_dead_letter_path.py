"""The dead-letter path's pure decisions: which advisories to believe, letters that fit,
letters that are ours, and header values whatever nats-py parsed."""

from __future__ import annotations

import json
from email.parser import BytesParser

import pytest
from hypothesis import given
from hypothesis import strategies as st

from troupe_runtime.contract import advisories, naming
from troupe_runtime.contract.advisories import Advisory, ConsumerState, Junk, Verdict
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.agent_resources import build_agent_resources
from troupe_runtime.contract.dead_letters import (
    DROPPED_HEADER,
    ERROR_HEADER,
    REASON_HEADER,
    DeadLetterReason,
    Origin,
    dead_letter_headers,
    equivalent,
    fitted,
    header_map,
    header_text,
    letter_id,
)
from troupe_runtime.contract.wire import message_size

STREAM, CONSUMER = "TROUPE_ns_a", "a_p0"
SUBJECT = naming.max_deliveries_advisory(STREAM, CONSUMER)
ORIGIN = Origin(subject="troupe.ns.agents.a.in.p0", stream=STREAM, sequence=5)


def advisory_body(**fields: object) -> bytes:
    body = {
        "type": advisories.ADVISORY_TYPE,
        "stream": STREAM,
        "consumer": CONSUMER,
        "stream_seq": 5,
        "deliveries": 3,
        **fields,
    }
    return json.dumps(body).encode()


def test_a_well_formed_advisory_about_an_own_consumer_is_read() -> None:
    parsed = advisories.parse(SUBJECT, advisory_body(), STREAM, {CONSUMER})

    assert parsed == Advisory(STREAM, CONSUMER, sequence=5, deliveries=3)


@pytest.mark.parametrize(
    ("subject", "data", "why"),
    [
        (SUBJECT, b"{not json", "not JSON"),
        (SUBJECT, b"[" * 5000 + b"]" * 5000, "bytes, over"),
        (SUBJECT, b"[" * 1500, "not JSON"),
        (SUBJECT, b"[1]", "not an object"),
        (SUBJECT, advisory_body(type="io.nats.other"), "type"),
        (SUBJECT, advisory_body(stream="TROUPE_other"), "stream"),
        (SUBJECT, advisory_body(consumer="someone_else"), "consumer"),
        (SUBJECT, advisory_body(stream_seq="5"), "stream_seq"),
        (SUBJECT, advisory_body(stream_seq=True), "stream_seq"),
        (SUBJECT, advisory_body(deliveries=0), "deliveries"),
        (naming.max_deliveries_advisory(STREAM, "a_p1"), advisory_body(), "does not match"),
    ],
)
def test_junk_on_the_advisory_subject_is_refused_with_a_reason(
    subject: str, data: bytes, why: str
) -> None:
    with pytest.raises(Junk, match=why):
        advisories.parse(subject, data, STREAM, {CONSUMER, "a_p1"})


@given(st.binary(max_size=3000))
def test_any_bytes_are_an_advisory_or_junk(data: bytes) -> None:
    try:
        parsed = advisories.parse(SUBJECT, data, STREAM, {CONSUMER})
    except Junk:
        return
    assert parsed.stream == STREAM
    assert parsed.sequence >= 1


def state(**fields: object) -> ConsumerState:
    values: dict[str, object] = {
        "filter_subject": ORIGIN.subject,
        "max_deliver": 3,
        "delivered_stream_seq": 9,
        "ack_floor_stream_seq": 2,
        "ack_pending": 1,
        **fields,
    }
    return ConsumerState(**values)  # type: ignore[arg-type]


ADVISORY = Advisory(STREAM, CONSUMER, sequence=5, deliveries=3)
APPROVALS = "troupe.ns.agents.a.approvals"


@pytest.mark.parametrize(
    ("consumer", "stored", "verdict"),
    [
        (state(), ORIGIN.subject, Verdict.DEFER),  # may be in flight: pending above the floor
        (state(ack_floor_stream_seq=5), ORIGIN.subject, Verdict.RESCUE),  # below the floor
        (state(ack_pending=0), ORIGIN.subject, Verdict.RESCUE),  # nothing is pending
        (state(ack_pending=0), None, Verdict.DROP),  # handled: no longer stored
        (state(ack_pending=0), "troupe.ns.agents.a.in.p1", Verdict.DROP),  # another consumer's
        (state(ack_pending=0, max_deliver=4), ORIGIN.subject, Verdict.DROP),  # too few
        (state(ack_pending=0, max_deliver=-1), ORIGIN.subject, Verdict.DROP),  # never gives up
        (state(ack_pending=0, delivered_stream_seq=4), ORIGIN.subject, Verdict.DROP),
        # An LLM agent's priority 0 reads its approvals subject too: both are its own.
        (
            state(ack_pending=0, filter_subject=None, filter_subjects=(ORIGIN.subject, APPROVALS)),
            APPROVALS,
            Verdict.RESCUE,
        ),
        (
            state(ack_pending=0, filter_subject=None, filter_subjects=(ORIGIN.subject, APPROVALS)),
            "troupe.ns.agents.a.in.p1",
            Verdict.DROP,
        ),
    ],
)
def test_an_advisory_is_acted_on_only_when_the_consumer_state_proves_it(
    consumer: ConsumerState, stored: str | None, verdict: Verdict
) -> None:
    assert advisories.judge(ADVISORY, consumer, stored)[0] is verdict


@given(
    floor=st.integers(0, 20),
    pending=st.integers(0, 5),
    delivered=st.integers(0, 20),
    deliveries=st.integers(1, 6),
)
def test_a_message_pending_an_acknowledgement_is_never_rescued(
    floor: int, pending: int, delivered: int, deliveries: int
) -> None:
    """A pending message lies above the floor and makes ``pending`` at least 1."""
    consumer = state(
        ack_floor_stream_seq=floor, ack_pending=max(pending, 1), delivered_stream_seq=delivered
    )
    in_flight = Advisory(STREAM, CONSUMER, sequence=floor + 1, deliveries=deliveries)

    assert advisories.judge(in_flight, consumer, ORIGIN.subject)[0] is not Verdict.RESCUE


def test_the_advisory_stream_is_bounded_and_refuses_messages_larger_than_an_advisory() -> None:
    config = RuntimeConfig(agent="a", namespace="ns")
    stream = build_agent_resources(config).advisories

    assert stream.max_msgs is not None
    assert 0 < stream.max_msgs <= 100_000
    assert stream.max_msg_size == advisories.MAX_ADVISORY_BYTES
    assert stream.max_bytes is not None
    assert stream.max_bytes > 0
    assert stream.discard is not None
    assert stream.discard.value == "old"


def test_the_inbox_stream_takes_exactly_the_declared_priority_levels() -> None:
    config = RuntimeConfig.model_validate(
        {"agent": "a", "namespace": "ns", "messaging": {"priorityLevels": 3}}
    )

    assert build_agent_resources(config).inbox.subjects == [
        "troupe.ns.agents.a.in.p0",
        "troupe.ns.agents.a.in.p1",
        "troupe.ns.agents.a.in.p2",
    ]


def letter(original: dict[str, str] | None = None, **fields: object) -> dict[str, str]:
    values: dict[str, object] = {
        "reason": DeadLetterReason.MALFORMED,
        "error": "bad",
        "attempts": 1,
        "agent": "ns/a",
        "origin": ORIGIN,
        **fields,
    }
    return dead_letter_headers(original or {"ce-id": "e1"}, **values)  # type: ignore[arg-type]


def test_letters_of_one_message_by_two_honest_writers_are_equivalent() -> None:
    by_replica = letter(reason=DeadLetterReason.EXHAUSTED, error="boom", attempts=3)
    by_rescuer = letter(reason=DeadLetterReason.MAX_DELIVERIES, error="crashed", attempts=3)

    assert equivalent(by_replica, b"data", by_rescuer, b"data")


@pytest.mark.parametrize(
    ("forged", "payload"),
    [
        (letter(), b"other data"),
        (letter({"ce-id": "forged"}), b"data"),
        (letter(origin=Origin(ORIGIN.subject, ORIGIN.stream, 6)), b"data"),
        ({"Nats-Msg-Id": letter_id(ORIGIN)}, b"data"),
    ],
)
def test_a_letter_that_took_the_id_first_but_is_not_this_message_s_is_not_equivalent(
    forged: dict[str, str], payload: bytes
) -> None:
    assert not equivalent(letter(), b"data", forged, payload)


def test_a_pre_empted_letter_id_gets_a_nonce_a_sender_cannot_know() -> None:
    assert letter_id(ORIGIN) == "dlq:TROUPE_ns_a:5"
    assert letter_id(ORIGIN, "f00d") == "dlq:TROUPE_ns_a:5:f00d"


def test_a_letter_too_large_for_max_payload_sheds_long_headers_then_its_payload() -> None:
    original = {"ce-id": "e1", "x-big": "v" * 5000}

    headers, payload = fitted(letter(original), b"p" * 1000, 4096)
    assert (payload, "x-big" in headers, headers["ce-id"]) == (b"p" * 1000, False, "e1")
    assert "original headers" in headers[DROPPED_HEADER]

    headers, payload = fitted(letter(original), b"p" * 5000, 4096)
    assert payload == b""
    assert "payload of 5000 bytes" in headers[DROPPED_HEADER]
    assert headers[REASON_HEADER] == "malformed"


@given(
    headers=st.dictionaries(
        st.text(st.characters(codec="ascii", exclude_characters=":\r\n"), min_size=1, max_size=20),
        st.text(max_size=3000),
        max_size=5,
    ),
    payload=st.binary(max_size=6000),
    error=st.text(max_size=3000),
)
def test_every_letter_fits_max_payload(headers: dict[str, str], payload: bytes, error: str) -> None:
    fitting, data = fitted(letter(headers, error=error), payload, 4096)

    assert message_size(data, fitting) <= 4096
    assert fitting[ERROR_HEADER]


def test_header_values_nats_py_parsed_from_raw_bytes_become_plain_text() -> None:
    parsed = BytesParser().parsebytes(b"X-A: caf\xc3\xa9\r\nX-B: \xff\r\nX-C: a\r\n b\r\n\r\n")

    assert header_map(dict(parsed.items())) == {"X-A": "café", "X-B": "\ufffd", "X-C": "a   b"}
    assert header_text("\ud800 lone") == "? lone"
