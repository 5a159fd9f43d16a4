"""The lease's reading of a probe answer or lease record, which any client can send."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from troupe_runtime.workflow.lease import _holder


def test_a_holder_is_read_from_its_record() -> None:
    assert _holder(json.dumps({"holder": "engine-1", "token": 3}).encode()) == "engine-1"


def test_json_nested_past_the_recursion_limit_names_no_holder() -> None:
    assert _holder(b"[" * 100_000 + b"]" * 100_000) is None


@given(st.binary(max_size=300))
def test_any_bytes_name_a_string_holder_or_none(data: bytes) -> None:
    holder = _holder(data)
    assert holder is None or isinstance(holder, str)


@given(st.recursive(st.none() | st.integers() | st.text(), lambda inner: st.lists(inner)))
def test_any_json_without_a_holder_field_names_none(value: object) -> None:
    assert _holder(json.dumps(value).encode()) is None
