"""What a webhook request and a captured subject message bring is hostile input: whatever
arrives, parsing yields the values, a refusal with its status, or a message that never
fires; nothing else is raised. Plus the rate limiter's arithmetic and the relay's stream
names."""

from __future__ import annotations

import json
import string
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from troupe_gateway.firing import RateLimiter, gcra
from troupe_gateway.relay import NeverFires, fire_of, message_event, trigger_of_stream
from troupe_gateway.webhooks import (
    HookRefused,
    delivery_headers,
    fire_input,
    normalized_signature,
    signature_task_id,
)

from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.triggers import (
    TriggerDefinition,
    TriggerRateLimit,
    TriggerSpec,
    sign,
    signature_problem,
)

HEADER_NAME = st.sampled_from(
    [
        "troupe-timestamp",
        "Troupe-Timestamp",
        "TROUPE-TIMESTAMP",
        "troupe-signature",
        "Troupe-Signature",
        "content-type",
        "ce-specversion",
        "ce-type",
        "ce-source",
        "ce-id",
        "ce-data",
        "x-other",
    ]
)
HEADERS = st.dictionaries(HEADER_NAME, st.text(max_size=120), max_size=6)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
BODIES = st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode())
DNS_LABEL = st.from_regex(r"[a-z]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
SECRET = b"s3cret-for-the-property-tests"


def spec(**more: Any) -> TriggerSpec:
    return TriggerSpec.model_validate(
        {
            "target": {"kind": "Agent", "name": "a"},
            "source": {"webhook": {"secretRef": {"name": "s"}}},
            **more,
        }
    )


@given(headers=HEADERS)
def test_any_headers_give_the_delivery_values_or_a_401(headers: dict[str, str]) -> None:
    refused: HookRefused | None = None
    try:
        timestamp, signature = delivery_headers(headers)
    except HookRefused as caught:
        refused = caught
    if refused is not None:
        assert refused.status == 401
        names = [k.lower() for k in headers]
        assert any(names.count(n) > 1 for n in ("troupe-timestamp", "troupe-signature"))
        return
    given_ts = [v for k, v in headers.items() if k.lower() == "troupe-timestamp"]
    assert timestamp == (given_ts[0].strip() if given_ts else None)
    assert signature is None or signature == signature.strip()


@given(
    timestamp=st.none() | st.text(max_size=30) | st.integers(0, 2**40).map(str),
    signature=st.none() | st.text(max_size=90),
    body=st.binary(max_size=200),
)
def test_only_the_true_signature_of_a_fresh_timestamp_passes(
    timestamp: str | None, signature: str | None, body: bytes
) -> None:
    now = 1_900_000_000.0
    window = timedelta(minutes=5)
    problem = signature_problem(SECRET, timestamp, signature, body, now, window)
    if problem is None:
        assert timestamp is not None
        assert signature is not None
        assert normalized_signature(signature) == sign(SECRET, timestamp, body)
        assert abs(now - int(timestamp)) <= 300
    true = str(int(now) - 10)
    assert signature_problem(SECRET, true, sign(SECRET, true, body), body, now, window) is None


@given(body=BODIES, use_input=st.booleans(), use_dedupe=st.booleans())
def test_any_body_maps_or_is_refused_with_413_or_422(
    body: bytes, use_input: bool, use_dedupe: bool
) -> None:
    trigger = spec(
        **({"input": "{v: a.b, n: length(c)}"} if use_input else {}),
        **({"dedupeKey": "id"} if use_dedupe else {}),
    )
    refused: HookRefused | None = None
    try:
        data, dedupe = fire_input(trigger, body)
    except HookRefused as caught:
        refused = caught
    if refused is not None:
        assert refused.status in (413, 422)
        return
    json.dumps(data, default=str)
    if not use_dedupe:
        assert dedupe is None


def test_the_signature_task_id_is_one_per_delivery_however_the_hex_is_cased() -> None:
    signature = sign(SECRET, "1", b"{}")
    assert signature_task_id("u", signature) == signature_task_id("u", signature.upper())
    assert signature_task_id("u", signature) != signature_task_id("v", signature)
    assert len(signature_task_id("u", signature)) <= 200


@given(headers=HEADERS, data=BODIES)
def test_any_captured_message_gives_an_event_or_never_fires(
    headers: dict[str, str], data: bytes
) -> None:
    never: NeverFires | None = None
    try:
        ce_type, source, _ = message_event(headers, data)
    except NeverFires as caught:
        never = caught
    if never is not None:
        assert str(never)
        return
    assert ce_type is None or isinstance(ce_type, str)
    assert source is None or isinstance(source, str)


def subject_trigger(filter_: dict[str, str] | None = None, **more: Any) -> TriggerDefinition:
    source: dict[str, Any] = {"subject": "shop.orders"}
    if filter_ is not None:
        source["filter"] = filter_
    return TriggerDefinition.model_validate(
        {
            "namespace": "ns",
            "name": "t",
            "uid": "u-1",
            "spec": {
                "target": {"kind": "Agent", "name": "a"},
                "source": {"subject": source},
                **more,
            },
        }
    )


def binary(kind: str, data: Any, source: str = "/shop") -> tuple[dict[str, str], bytes]:
    event = CloudEvent(
        id="e", source=source, type=kind, datacontenttype=envelope.JSON_CONTENT_TYPE, data=data
    )
    return envelope.to_binary(event)


def test_a_matching_cloud_event_fires_with_its_data_mapped_and_the_stream_sequence() -> None:
    trigger = subject_trigger({"type": "order.created"}, input="id")
    headers, payload = binary("order.created", {"id": "o-1"})
    assert fire_of(trigger, headers, payload, 7) == ("o-1", "trg-u-1-7")
    structured = {"specversion": "1.0", "id": "e", "source": "/s", "type": "order.created"}
    body = json.dumps(structured | {"data": {"id": "o-2"}}).encode()
    assert fire_of(trigger, {}, body, 8) == ("o-2", "trg-u-1-8")


def test_a_mismatch_a_non_event_and_a_broken_event_never_fire() -> None:
    trigger = subject_trigger({"type": "order.created", "source": "/shop"})
    headers, payload = binary("order.deleted", {"id": "o-1"})
    with pytest.raises(NeverFires, match="does not match the Trigger's filter"):
        fire_of(trigger, headers, payload, 1)
    headers, payload = binary("order.created", {}, source="/elsewhere")
    with pytest.raises(NeverFires, match="does not match"):
        fire_of(trigger, headers, payload, 1)
    with pytest.raises(NeverFires, match="does not match"):
        fire_of(trigger, {}, b"plain text", 1)
    with pytest.raises(NeverFires, match="CloudEvent"):
        fire_of(trigger, {"ce-specversion": "1.0"}, b"{}", 1)


def test_without_a_filter_any_message_fires_and_a_dedupe_key_names_the_task() -> None:
    trigger = subject_trigger(dedupeKey="id")
    first = fire_of(trigger, {}, b'{"id": 1, "x": 1}', 1)
    again = fire_of(trigger, {}, b'{"id": 1, "x": 2}', 2)
    assert first[1] == again[1] != fire_of(trigger, {}, b'{"id": 2}', 3)[1]
    assert fire_of(subject_trigger(), {}, b"plain text", 4) == ("plain text", "trg-u-1-4")


@given(namespace=DNS_LABEL, trigger=DNS_LABEL)
def test_a_trigger_stream_name_gives_back_its_namespace_and_trigger(
    namespace: str, trigger: str
) -> None:
    assert trigger_of_stream(naming.trigger_stream(namespace, trigger)) == (namespace, trigger)


@given(name=st.text(alphabet=string.ascii_letters + string.digits + "_-.", max_size=40))
def test_other_stream_names_are_no_trigger_streams(name: str) -> None:
    found = trigger_of_stream(name)
    if found is not None:
        assert naming.trigger_stream(*found) == name
    assert trigger_of_stream(f"KV_{name}") is None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def limited(per_minute: int, burst: int) -> TriggerDefinition:
    return TriggerDefinition.model_validate(
        {
            "namespace": "ns",
            "name": "t",
            "uid": "u-1",
            "spec": spec(rateLimit={"perMinute": per_minute, "burst": burst}).model_dump(
                by_alias=True
            ),
        }
    )


async def test_the_rate_limit_lets_a_burst_through_then_one_per_period() -> None:
    clock = Clock()
    limiter = RateLimiter(None, clock)
    trigger = limited(6, 2)
    assert await limiter.take(trigger) == 0
    assert await limiter.take(trigger) == 0
    assert await limiter.take(trigger) == pytest.approx(10.0)
    clock.now += 10.0
    assert await limiter.take(trigger) == 0
    assert await limiter.take(trigger) > 0
    await limiter.give_back(trigger)
    assert await limiter.take(trigger) == 0
    unlimited = trigger.model_copy(update={"spec": spec()})
    assert await limiter.take(unlimited) == 0


@given(
    tat=st.floats(allow_nan=True, allow_infinity=True),
    per_minute=st.integers(1, 100_000),
    burst=st.integers(1, 100_000),
)
def test_a_gcra_step_on_any_stored_value_waits_at_most_a_burst(
    tat: float, per_minute: int, burst: int
) -> None:
    now = 1_900_000_000.0
    limit = TriggerRateLimit(per_minute=per_minute, burst=burst)
    wait, after = gcra(tat, now, limit)
    interval = 60.0 / per_minute
    assert 0 <= wait <= burst * interval + 5.0 + 1e-6
    if wait == 0:
        assert now < after <= now + burst * interval + 5.0 + interval + 1e-6
