"""The pure parts of the state API: backoff, tuning bounds, the JSON codec, error messages."""

from __future__ import annotations

import math
import random

import pytest
from nats.aio.client import Client as NATS

from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.policies import StateBucket
from troupe_runtime.contract.state_codec import decode, encode
from troupe_runtime.state import ConflictError, InvalidValueError, StateStore, Tuning
from troupe_runtime.state.policies import backoff_delay


def test_backoff_is_jittered_below_an_exponential_ceiling_and_capped() -> None:
    tuning = Tuning(backoff_base=0.01, backoff_cap=0.05)
    rng = random.Random(7)

    delays = {
        attempt: [backoff_delay(attempt, tuning, rng) for _ in range(200)] for attempt in (0, 1, 10)
    }

    assert all(0 <= d <= 0.01 for d in delays[0])
    assert all(0 <= d <= 0.02 for d in delays[1])
    assert all(0 <= d <= 0.05 for d in delays[10])
    assert len(set(delays[10])) == 200


@pytest.mark.parametrize("bad", [{"attempts": 0}, {"lock_ttl": 0}])
def test_tuning_refuses_bounds_that_cannot_work(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="Tuning"):
        Tuning(**bad)


def test_values_round_trip_as_compact_json() -> None:
    value = {"name": "zoë", "items": [1, 2.5, None, True]}

    assert encode(value) == '{"name":"zoë","items":[1,2.5,null,true]}'.encode()
    assert decode(encode(value), "b/k") == value


@pytest.mark.parametrize("value", [math.nan, {1, 2}, object()])
def test_a_value_that_is_not_json_is_refused(value: object) -> None:
    with pytest.raises(InvalidValueError, match="JSON"):
        encode(value)


def test_bytes_that_are_not_json_are_refused_naming_where_they_were() -> None:
    with pytest.raises(InvalidValueError, match="orders/o-1"):
        decode(b"\x00raw", "orders/o-1")


def test_a_conflict_error_names_the_key_and_both_revisions() -> None:
    message = str(ConflictError("orders", "o-1", expected=4, actual=7, attempts=3))

    assert message == (
        "key 'o-1' in state bucket 'orders' changed concurrently: "
        "expected revision 4, found 7 after 3 attempt(s)"
    )


def test_a_merge_function_is_refused_for_a_bucket_that_does_not_merge() -> None:
    config = RuntimeConfig(
        agent="a", namespace="n", state=[StateBucket(name="orders", conflict_policy="retry")]
    )
    store = StateStore(NATS().jetstream(), config)

    with pytest.raises(ValueError, match="conflictPolicy retry"):
        store.register_merge("orders", lambda base, ours, theirs: ours)
