"""The plain endpoint's parsers take any query value and body: a number of seconds in
bounds or a 400, JSON or a 400/413, never an exception of another kind."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.requests import Request
from troupe_gateway.calls import CallRefused
from troupe_gateway.plain import (
    MAX_BODY_BYTES,
    MAX_TIMEOUT_SECONDS,
    bounded_body,
    input_of,
    timeout_of,
)


@given(st.text(max_size=40))
def test_any_timeout_value_is_seconds_in_bounds_or_a_400(value: str) -> None:
    status, seconds = 0, 0.0
    try:
        seconds = timeout_of(value)
    except CallRefused as refused:
        status = refused.status
    assert status in (0, 400)
    assert 0 <= seconds <= MAX_TIMEOUT_SECONDS


@given(st.binary(max_size=200))
def test_any_body_is_json_or_a_400(body: bytes) -> None:
    status = 0
    try:
        input_of(body)
    except CallRefused as refused:
        status = refused.status
    assert status in (0, 400)


@given(
    st.recursive(
        st.none() | st.integers() | st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c)
    )
)
def test_json_bodies_are_the_input(value: object) -> None:
    assert input_of(json.dumps(value).encode()) == value


def test_a_body_too_large_is_413_and_deep_nesting_a_400() -> None:
    with pytest.raises(CallRefused) as large:
        input_of(b" " * (MAX_BODY_BYTES + 1))
    assert large.value.status == 413
    with pytest.raises(CallRefused) as deep:
        input_of(b"[" * 100_000)
    assert deep.value.status == 400


async def test_a_body_without_a_length_is_refused_once_past_the_cap_not_read_whole() -> None:
    chunk = b"x" * 65_536
    sent = 0

    async def receive() -> dict[str, object]:
        nonlocal sent
        sent += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(CallRefused) as refused:
        await bounded_body(request)
    assert refused.value.status == 413
    assert sent == MAX_BODY_BYTES // len(chunk) + 1  # read to the cap, and no further


async def test_a_body_under_the_cap_is_read_whole() -> None:
    parts = [b'{"a": ', b"1}"]

    async def receive() -> dict[str, object]:
        body = parts.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(parts)}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    assert input_of(await bounded_body(request)) == {"a": 1}
