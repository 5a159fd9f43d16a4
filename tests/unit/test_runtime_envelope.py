"""The CloudEvents envelope: both modes in, binary mode out, deterministic follow-ups."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest

from troupe_runtime.contract.envelope import (
    CloudEvent,
    MalformedMessage,
    child_traceparent,
    parse,
    to_binary,
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
BINARY = {
    "ce-specversion": "1.0",
    "ce-id": "e-1",
    "ce-source": "/tests",
    "ce-type": "test.input",
    "ce-priority": "2",
    "ce-correlationid": "run-7",
    "ce-traceparent": TRACEPARENT,
    "ce-region": "eu",
    "Nats-Msg-Id": "ignored",
}


def test_binary_mode_reads_attributes_from_headers_and_json_data_from_the_payload() -> None:
    event = parse(BINARY, b'{"q": 1}')

    assert (event.id, event.priority, event.correlationid) == ("e-1", 2, "run-7")
    assert event.data == {"q": 1}
    assert event.model_extra == {"region": "eu"}


def test_structured_mode_is_accepted_with_base64_data() -> None:
    body = {
        "specversion": "1.0",
        "id": "e-2",
        "source": "/tests",
        "type": "t",
        "datacontenttype": "application/octet-stream",
        "data_base64": base64.b64encode(b"\x00\x01").decode(),
    }
    event = parse({"content-type": "application/cloudevents+json"}, json.dumps(body).encode())

    assert event.data == b"\x00\x01"


@pytest.mark.parametrize(
    ("headers", "payload", "reason"),
    [
        (BINARY, b"{oops", "data is not valid JSON"),
        (None, b'{"hello": 1}', "not a CloudEvent: no ce-specversion header"),
        (None, b"plain text", "not a CloudEvent: body is not valid JSON"),
        ({**BINARY, "ce-id": ""}, b"1", "not a CloudEvent: id: String should have at least"),
        ({**BINARY, "ce-deadline": "2030-01-01T00:00:00"}, b"1", "not a CloudEvent: deadline"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(
    headers: dict[str, str] | None, payload: bytes, reason: str
) -> None:
    with pytest.raises(MalformedMessage) as caught:
        parse(headers, payload)

    assert caught.value.reason.startswith(reason)


def test_binary_encoding_round_trips() -> None:
    event = CloudEvent(
        id="e-3",
        source="/s",
        type="t",
        time=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
        datacontenttype="application/json",
        data={"x": [1, 2]},
    )
    headers, payload = to_binary(event)

    assert headers["ce-time"] == "2030-01-02T03:04:05Z"
    assert headers["content-type"] == "application/json"
    assert parse(headers, payload) == event


def test_follow_up_ids_depend_only_on_the_input_the_producer_and_the_index() -> None:
    cause = parse(BINARY, b"1")
    first = cause.follow_up(source="/a", type="t.out", data=1, index=0, scope="ns/a")
    again = cause.follow_up(source="/a", type="t.out", data=2, index=0, scope="ns/a")
    second = cause.follow_up(source="/a", type="t.out", data=1, index=1, scope="ns/a")
    other_agent = cause.follow_up(source="/b", type="t.out", data=1, index=0, scope="ns/b")

    assert first.id == again.id
    assert len({first.id, second.id, other_agent.id}) == 3
    assert (first.causationid, first.correlationid, first.priority) == ("e-1", "run-7", 2)


def test_the_trace_continues_across_a_hop_with_a_new_span() -> None:
    child = child_traceparent(TRACEPARENT)

    assert child.split("-")[1] == TRACEPARENT.split("-")[1]
    assert child.split("-")[2] != TRACEPARENT.split("-")[2]
    assert len(child_traceparent(None).split("-")[1]) == 32
