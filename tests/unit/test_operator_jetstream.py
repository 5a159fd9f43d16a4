"""Deletion of shared JetStream resources: each goes with the last Agent that uses it."""

from __future__ import annotations

from typing import Any

from troupe_operator.api import AgentSpec
from troupe_operator.builders.jetstream import orphaned_streams


def _spec(**fields: Any) -> AgentSpec:
    return AgentSpec.model_validate({"role": "r", **fields})


def test_the_last_agent_of_a_namespace_takes_its_buckets_and_event_log() -> None:
    spec = _spec(state=[{"name": "notes"}], rateLimit={"rate": 1, "scope": "global"})

    assert orphaned_streams("ns", spec, []) == [
        "KV_troupe_ns_state_notes",
        "KV_troupe_ns_ratelimits",
        "TROUPE_EVENTS_ns",
    ]


def test_a_bucket_another_agent_declares_stays() -> None:
    spec = _spec(state=[{"name": "notes"}, {"name": "drafts"}])
    other = _spec(state=[{"name": "notes"}], rateLimit={"rate": 1, "scope": "global"})

    assert orphaned_streams("ns", spec, [other]) == ["KV_troupe_ns_state_drafts"]


def test_the_global_rate_limit_bucket_stays_while_another_agent_limits_globally() -> None:
    spec = _spec(rateLimit={"rate": 1, "scope": "global"})
    other = _spec(rateLimit={"rate": 5, "scope": "global"})

    assert orphaned_streams("ns", spec, [other]) == []
