"""JSON that any client can write (KV values, tally messages) never escapes as a crash."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from troupe_runtime.contract import state_codec
from troupe_runtime.contract.state_errors import InvalidValueError
from troupe_runtime.workflow.runlog import _run_named

DEEP = b"[" * 100_000 + b"]" * 100_000


def test_a_state_value_nested_past_the_recursion_limit_is_an_invalid_value() -> None:
    with pytest.raises(InvalidValueError, match="notes/k does not hold JSON"):
        state_codec.decode(DEEP, "notes/k")


def test_a_tally_names_its_run() -> None:
    assert _run_named(json.dumps({"run": "r1"}).encode()) == "r1"


@pytest.mark.parametrize("data", [DEEP, b"not json", b'["run"]', b'{"run": 7}', b"null"])
def test_a_tally_that_names_no_run_is_ignored(data: bytes) -> None:
    assert _run_named(data) == ""


@given(st.binary(max_size=300))
def test_any_bytes_are_a_state_value_or_an_invalid_value(data: bytes) -> None:
    with contextlib.suppress(InvalidValueError):
        state_codec.decode(data, "b/k")


@given(st.binary(max_size=300))
def test_any_bytes_name_a_run_id_string(data: bytes) -> None:
    assert isinstance(_run_named(data), str)
