"""The message boundary: limits, the CloudEvents NATS binding, pathological payloads, trace context.

Examples pin each rule; the hypothesis properties throw arbitrary headers and
payloads at ``parse`` (only ``MalformedMessage`` may come out, never a
``RecursionError``), and check that what ``to_binary`` writes reads back as
the same event and that no output ever carries NaN or Infinity as JSON.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from troupe_runtime.agent.schemas import SchemaViolation
from troupe_runtime.contract.envelope import (
    CloudEvent,
    MalformedMessage,
    UnpublishableEvent,
    child_traceparent,
    encode_json,
    parse,
    percent_decode,
    percent_encode,
    to_binary,
    valid_traceparent,
)
from troupe_runtime.contract.limits import MAX_JSON_DEPTH, Limits

T = TypeVar("T")
E = TypeVar("E", bound=Exception)
BINARY = {"ce-specversion": "1.0", "ce-id": "e-1", "ce-source": "/tests", "ce-type": "t"}
TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{SPAN}-01"


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def attempt(call: Callable[[], T], refusal: type[E]) -> T | E:
    """What ``call`` returns, or the ``refusal`` it raises (anything else fails the test)."""
    try:
        return call()
    except refusal as error:
        return error


def reason(headers: dict[str, str] | None, payload: bytes, **limits: int) -> str:
    with pytest.raises(MalformedMessage) as caught:
        parse(headers, payload, Limits(**limits))
    return caught.value.reason


def structured(**body: Any) -> tuple[dict[str, str], bytes]:
    event = {"specversion": "1.0", "id": "s-1", "source": "/tests", "type": "t", **body}
    return {"content-type": "application/cloudevents+json"}, json.dumps(event).encode()


def cause(**attributes: Any) -> CloudEvent:
    return CloudEvent(id="c-1", source="/tests", type="t", **attributes)


# -- limits ---------------------------------------------------------------------------


def test_json_nested_far_beyond_any_limit_is_malformed_at_once() -> None:
    assert reason(BINARY, nested(100_000)) == "data nests deeper than the limit of 64 levels"


def test_json_one_level_past_the_depth_limit_is_malformed_and_at_the_limit_is_read() -> None:
    assert parse(BINARY, nested(MAX_JSON_DEPTH)).data is not None
    assert reason(BINARY, nested(MAX_JSON_DEPTH + 1)).startswith("data nests deeper")


def test_a_structured_event_with_deep_data_is_malformed() -> None:
    headers, _ = structured()
    body = b'{"specversion":"1.0","id":"1","source":"/s","type":"t","data":' + nested(5000) + b"}"

    assert "nests deeper than the limit" in reason(headers, body)


def test_a_payload_over_the_limit_is_refused_naming_the_size_and_the_limit() -> None:
    assert reason(BINARY, b"1" * 101, payload_bytes=100) == (
        "payload is 101 bytes, over the limit of 100 bytes; send less data per message"
    )


def test_a_huge_header_value_is_refused_naming_the_header() -> None:
    headers = {**BINARY, "ce-correlationid": "x" * 40_000}

    assert reason(headers, b"1") == (
        "header ce-correlationid is 40000 bytes, over the limit of 4096 bytes for one header value"
    )


def test_headers_over_the_total_limit_are_refused() -> None:
    headers = {**BINARY, **{f"ce-x{n}": "v" * 3000 for n in range(6)}}

    assert reason(headers, b"1").startswith("headers are ")
    assert "over the limit of 16384 bytes for all headers" in reason(headers, b"1")


# -- pathological payloads ----------------------------------------------------------


@pytest.mark.parametrize("payload", [b"NaN", b'{"x": Infinity}', b"[-Infinity]"])
def test_nan_and_infinity_are_not_json(payload: bytes) -> None:
    assert reason(BINARY, payload).startswith("data is not valid JSON: ")


def test_a_number_no_double_can_hold_is_refused() -> None:
    assert reason(BINARY, b'{"x": 1e400}') == (
        "data is not valid JSON: the number 1e400 is out of range for a 64-bit float"
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_an_output_holding_nan_or_infinity_is_never_published_as_json(value: float) -> None:
    output = cause().follow_up(source="/a", type="t.out", data={"x": [value]}, index=0, scope="s")

    with pytest.raises(SchemaViolation) as caught:
        to_binary(output)

    assert isinstance(caught.value, UnpublishableEvent)
    assert caught.value.reason.startswith("data holds ")
    assert caught.value.reason.endswith("which JSON cannot carry (no NaN or Infinity) at /x/0")


def test_an_output_json_cannot_represent_is_unpublishable() -> None:
    with pytest.raises(UnpublishableEvent, match=r"holds a set, which JSON cannot represent at /s"):
        encode_json({"s": {1, 2}})


def test_an_output_nested_too_deep_is_unpublishable() -> None:
    deep: Any = []
    for _ in range(10_000):
        deep = [deep]

    with pytest.raises(UnpublishableEvent, match=r"nests deeper than the limit of 64 levels"):
        encode_json(deep)


def test_data_together_with_data_base64_is_refused() -> None:
    headers, body = structured(data={"a": 1}, data_base64=base64.b64encode(b"x").decode())

    assert reason(headers, body) == (
        "not a CloudEvent: it has both data and data_base64; the JSON format allows one"
    )


def test_batched_mode_is_refused_with_its_name() -> None:
    headers = {"content-type": "application/cloudevents-batch+json"}

    assert "batched mode" in reason(headers, b"[]")


# -- the CloudEvents NATS binding -----------------------------------------------------


def test_ce_datacontenttype_alone_sets_the_data_type_as_the_go_sdk_sends_it() -> None:
    event = parse({**BINARY, "ce-datacontenttype": "text/plain"}, b"hello, world")

    assert (event.datacontenttype, event.data) == ("text/plain", "hello, world")


def test_ce_datacontenttype_json_is_decoded_as_json() -> None:
    assert parse({**BINARY, "ce-datacontenttype": "application/json"}, b'{"a":1}').data == {"a": 1}


def test_content_type_and_ce_datacontenttype_that_disagree_are_refused() -> None:
    headers = {**BINARY, "ce-datacontenttype": "text/plain", "content-type": "application/json"}

    assert "disagree" in reason(headers, b"x")


def test_both_content_type_headers_are_written() -> None:
    headers, _ = to_binary(cause(datacontenttype="text/plain; charset=utf-8", data="hi"))

    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["ce-datacontenttype"] == "text/plain;%20charset=utf-8"


def test_header_values_are_percent_decoded_on_input() -> None:
    event = parse({**BINARY, "ce-id": "Euro%20%e2%82%ac%20%F0%9F%98%80", "ce-x": "%41bc"}, b"")

    assert event.id == "Euro \u20ac \U0001f600"
    assert event.model_extra == {"x": "Abc"}


def test_a_double_quoted_header_value_is_unquoted_before_decoding() -> None:
    assert parse({**BINARY, "ce-subject": '"a \\"b\\" %25"'}, b"").subject == 'a "b" %'


def test_percent_encoded_bytes_that_are_not_utf8_are_refused() -> None:
    assert reason({**BINARY, "ce-id": "%C0%A0"}, b"").startswith(
        "header ce-id is not UTF-8 once percent-decoded"
    )


def test_header_values_are_percent_encoded_on_output_and_round_trip() -> None:
    event = cause(subject="Euro \u20ac \U0001f600", correlationid='50% "off"')
    headers, payload = to_binary(event)

    assert headers["ce-subject"] == "Euro%20%E2%82%AC%20%F0%9F%98%80"
    assert headers["ce-correlationid"] == "50%25%20%22off%22"
    assert all(value.isascii() for value in headers.values())
    assert parse(headers, payload) == event


def test_text_data_reaches_the_handler_as_str_in_its_charset() -> None:
    headers = {**BINARY, "content-type": "text/plain; charset=latin-1"}

    assert parse(headers, "caf\u00e9".encode("latin-1")).data == "caf\u00e9"
    assert reason({**BINARY, "content-type": "text/plain"}, b"\xff").startswith(
        "data is not valid utf-8 text"
    )


def test_other_data_reaches_the_handler_as_bytes() -> None:
    headers = {**BINARY, "content-type": "application/octet-stream"}

    assert parse(headers, b"\x00\xff").data == b"\x00\xff"


@pytest.mark.parametrize(
    ("content_type", "data"),
    [("text/plain", "hello"), ("application/pdf", b"%PDF-1.7"), ("text/csv", b"a,b")],
)
def test_non_json_data_is_echoed_back_with_its_content_type(content_type: str, data: Any) -> None:
    payload = data if isinstance(data, bytes) else data.encode()
    received = parse({**BINARY, "content-type": content_type}, payload)
    echo = received.follow_up(source="/a", type="t.out", data=received.data, index=0, scope="s")
    headers, body = to_binary(echo)

    assert headers["content-type"] == content_type
    assert body == payload


def test_json_data_answered_with_text_is_a_json_string() -> None:
    echo = cause().follow_up(source="/a", type="t.out", data="hi", index=0, scope="s")

    assert to_binary(echo)[1] == b'"hi"'


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({**BINARY, "ce-foo_bar": "1"}, "is no attribute name"),
        ({**BINARY, "CE-ID": "e-2"}, "are one header"),
        ({**BINARY, "ce-data": "1"}, "in binary mode the data is the payload"),
        ({**BINARY, "ce-id": "a%0Ab"}, "holds U+000A at index 1"),
    ],
)
def test_headers_that_break_the_binding_are_refused(headers: dict[str, str], why: str) -> None:
    assert why in reason(headers, b"")


# -- trace context ----------------------------------------------------------------


@pytest.mark.parametrize(
    "traceparent",
    [
        f"ff-{TRACE}-{SPAN}-01",
        f"00-{'0' * 32}-{SPAN}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE.upper()}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-01-extra",
        "nope",
    ],
)
def test_an_invalid_traceparent_is_dropped_and_the_next_hop_starts_a_new_trace(
    traceparent: str,
) -> None:
    event = parse({**BINARY, "ce-traceparent": traceparent}, b"1")
    output = event.follow_up(source="/a", type="t.out", data=1, index=0, scope="s")

    assert event.traceparent is None
    assert output.traceparent is not None
    assert valid_traceparent(output.traceparent)
    assert output.traceparent.split("-")[1] not in traceparent


def test_a_valid_traceparent_is_continued_and_a_later_version_is_answered_in_00() -> None:
    later = f"01-{TRACE}-{SPAN}-01-more"

    assert parse({**BINARY, "ce-traceparent": TRACEPARENT}, b"1").traceparent == TRACEPARENT
    assert valid_traceparent(later)
    assert child_traceparent(later).startswith(f"00-{TRACE}-")
    assert child_traceparent(f"ff-{TRACE}-{SPAN}-01").split("-")[1] != TRACE


# -- properties -------------------------------------------------------------------

ATTRIBUTE_HEADERS = [
    "ce-specversion",
    "ce-id",
    "ce-source",
    "ce-type",
    "ce-time",
    "ce-priority",
    "ce-deadline",
    "ce-traceparent",
    "ce-datacontenttype",
    "content-type",
    "ce-x",
]
header_values = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["1.0", "application/json", "text/plain", "%", "%C3", '"', "2030-01-01T00:00Z"]
    ),
    st.text(alphabet='%0123456789abcdefABCDEF"\\', max_size=20),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
payloads = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.integers(0, 3000).map(nested),
    st.integers(0, 3000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    st.sampled_from([b"NaN", b"1e400", b'{"data":1,"data_base64":"AA=="}', b"[" * 5000]),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from([{}, BINARY]),
    headers=st.dictionaries(
        st.one_of(st.sampled_from(ATTRIBUTE_HEADERS), st.text(max_size=12)), header_values
    ),
    payload=payloads,
)
def test_parse_raises_nothing_but_malformed_message(
    base: dict[str, str], headers: dict[str, str], payload: bytes
) -> None:
    result = attempt(lambda: parse({**base, **headers}, payload), MalformedMessage)

    assert isinstance(result, CloudEvent) or result.reason


@settings(max_examples=200)
@given(body=json_values, depth=st.integers(0, 200))
def test_structured_events_of_any_shape_are_read_or_refused(body: Any, depth: int) -> None:
    event = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": body}
    payload = json.dumps(event).encode()
    payload = payload[:-1] + b',"deep":' + nested(depth) + b"}"
    headers = {"content-type": "application/cloudevents+json"}
    result = attempt(lambda: parse(headers, payload), MalformedMessage)

    assert isinstance(result, CloudEvent) or result.reason.startswith("not a CloudEvent")


attribute_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cc", "Cs"]), min_size=1, max_size=20
)
extension_names = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True).filter(
    lambda name: name not in CloudEvent.model_fields
)
contents = st.one_of(
    st.tuples(st.just("application/json"), json_values),
    st.tuples(st.just("text/plain; charset=utf-8"), st.text(min_size=1, max_size=40)),
    st.tuples(st.just("application/octet-stream"), st.binary(min_size=1, max_size=40)),
)


@settings(max_examples=300)
@given(
    event_id=attribute_text,
    source=attribute_text,
    subject=st.none() | attribute_text,
    time=st.none()
    | st.datetimes(datetime(1970, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC)),
    priority=st.none() | st.integers(0, 9),
    extensions=st.dictionaries(extension_names, attribute_text, max_size=3),
    content=contents,
)
def test_what_to_binary_writes_reads_back_as_the_same_event(
    event_id: str,
    source: str,
    subject: str | None,
    time: datetime | None,
    priority: int | None,
    extensions: dict[str, str],
    content: tuple[str, Any],
) -> None:
    content_type, data = content
    attributes: dict[str, Any] = {
        **extensions,
        "id": event_id,
        "source": source,
        "type": "t",
        "subject": subject,
        "time": time,
        "priority": priority,
        "traceparent": TRACEPARENT,
        "datacontenttype": content_type,
        "data": data,
    }
    event = CloudEvent.model_validate(attributes)
    headers, payload = to_binary(event)

    assert all(value.isascii() for value in headers.values())
    assert parse(headers, payload) == event


@given(st.text())
def test_percent_encoding_round_trips_any_unicode(text: str) -> None:
    encoded = percent_encode(text)

    assert encoded.isascii()
    assert " " not in encoded
    assert '"' not in encoded
    assert percent_decode(encoded, "ce-x") == text


@given(st.text(alphabet=st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010)))
def test_lone_surrogates_are_refused_precisely_never_crashing(text: str) -> None:
    result = attempt(lambda: percent_encode(text), UnpublishableEvent)

    assert result.isascii() if isinstance(result, str) else "lone surrogate" in result.reason


@given(st.text(max_size=60))
def test_percent_decoding_raises_nothing_but_malformed_message(text: str) -> None:
    result = attempt(lambda: percent_decode(text, "ce-x"), MalformedMessage)

    assert isinstance(result, str) or result.reason.startswith("header ce-x is not UTF-8")


any_floats = st.floats(allow_nan=True, allow_infinity=True)
values_with_anything = st.recursive(
    st.one_of(json_scalars, any_floats, st.sets(st.integers(), max_size=2)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)


def _no_constants(name: str) -> None:
    raise AssertionError(f"{name} was published as JSON")


@given(values_with_anything)
def test_json_outputs_never_carry_nan_or_infinity(value: Any) -> None:
    result = attempt(lambda: encode_json(value), UnpublishableEvent)

    if isinstance(result, bytes):
        json.loads(result, parse_constant=_no_constants)
    else:
        assert result.reason.startswith("data ")


@given(st.integers(0, 300))
def test_depth_decides_alone_whether_nested_json_is_read(depth: int) -> None:
    result = attempt(lambda: parse(BINARY, nested(depth)), MalformedMessage)

    assert isinstance(result, CloudEvent) == (depth <= MAX_JSON_DEPTH)
