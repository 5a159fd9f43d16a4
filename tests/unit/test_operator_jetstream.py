"""Shared JetStream resources: one config per namespace, gone with the last Agent using
them; and the spec field behind each JetStream setting."""

from __future__ import annotations

from random import Random
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from troupe_operator.api import AgentSpec, WorkflowSpec
from troupe_operator.builders.engine import build_engine_config
from troupe_operator.builders.jetstream import (
    agent_spec_fields,
    orphaned_streams,
    shared_buckets,
    with_shared_buckets,
    workflow_spec_fields,
)
from troupe_operator.builders.pods import Owner
from troupe_operator.builders.workload import build_runtime_config
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_resources import AgentResources, build_agent_resources
from troupe_runtime.contract.workflow_resources import build_workflow_resources


def _spec(**fields: Any) -> AgentSpec:
    return AgentSpec.model_validate({"role": "r", **fields})


def test_the_last_agent_of_a_namespace_takes_its_buckets_chaos_bucket_and_event_log() -> None:
    spec = _spec(state=[{"name": "notes"}], rateLimit={"rate": 1, "scope": "global"})

    assert orphaned_streams("ns", spec, []) == [
        "KV_troupe_ns_state_notes",
        "KV_troupe_ns_ratelimits",
        "KV_troupe_ns_chaos",
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


def _resources(namespace: str, name: str, spec: AgentSpec) -> AgentResources:
    config = build_runtime_config(Owner(namespace, name, uid="u"), spec, "nats://nats:4222")
    return build_agent_resources(config)


def test_a_shared_bucket_keeps_the_most_history_any_declarer_asks_for() -> None:
    declarers = [
        _spec(state=[{"name": "notes", "history": 3}]),
        _spec(state=[{"name": "notes", "history": 5}, {"name": "drafts"}]),
    ]

    buckets = shared_buckets("ns", declarers)

    assert {name: config.history for name, config in buckets.items()} == {"notes": 5, "drafts": 1}
    assert buckets["notes"].bucket == "troupe_ns_state_notes"


def test_two_agents_declaring_one_bucket_provision_it_alike() -> None:
    first = _spec(state=[{"name": "notes", "history": 2}])
    second = _spec(state=[{"name": "notes", "history": 7}])

    mine = with_shared_buckets(_resources("ns", "first", first), "ns", first, [second])
    theirs = with_shared_buckets(_resources("ns", "second", second), "ns", second, [first])

    assert mine.buckets == theirs.buckets
    assert [bucket.history for bucket in mine.buckets] == [7]


def test_the_rate_limit_bucket_is_not_a_state_bucket() -> None:
    spec = _spec(
        state=[{"name": "ratelimits", "history": 4}], rateLimit={"rate": 1, "scope": "global"}
    )

    buckets = with_shared_buckets(_resources("ns", "a", spec), "ns", spec, []).buckets

    assert [(bucket.bucket, bucket.history) for bucket in buckets] == [
        ("troupe_ns_state_ratelimits", 4),
        ("troupe_ns_ratelimits", 1),
    ]


histories = st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=6)


@given(histories, st.randoms())
def test_shared_settings_do_not_depend_on_the_order_of_the_declarers(
    history: list[int], random: Random
) -> None:
    declarers = [_spec(state=[{"name": "notes", "history": kept}]) for kept in history]
    shuffled = list(declarers)
    random.shuffle(shuffled)

    assert shared_buckets("ns", declarers) == shared_buckets("ns", shuffled)
    assert shared_buckets("ns", declarers)["notes"].history == max(history)


def test_a_refusal_names_the_agent_field_its_setting_comes_from() -> None:
    spec = _spec(state=[{"name": "notes"}])
    resources = _resources("ns", "a", spec)
    fields = agent_spec_fields("ns", resources, spec)

    ack_wait = "invalid JSON: cannot unmarshal number into field config.ack_wait of type"
    assert fields.of_refusal("consumer/TROUPE_ns_a/a_p0", ack_wait) == "spec.messaging.ackWait"
    assert fields.of_refusal("bucket/troupe_ns_state_notes", "bad") == "spec.state[0].name"
    assert fields.of_refusal("stream/TROUPE_DLQ_ns_a", "max_age") == "spec.deadLetter.retention"
    assert fields.of_subject(naming.inbox_subject("ns", "a", 0)) == "metadata.name"


def test_a_refusal_names_the_workflow_field_its_setting_comes_from() -> None:
    spec = WorkflowSpec.model_validate(
        {"trigger": {"subject": "orders.placed"}, "steps": [{"name": "s", "agentRef": "a"}]}
    )
    config = build_engine_config(Owner("ns", "w", uid="u", kind="Workflow"), spec, "nats://n")
    fields = workflow_spec_fields(build_workflow_resources(config))

    assert fields.of_subject("orders.placed") == "spec.trigger.subject"
    assert fields.of_subject(config.subject("start")) == "metadata.name"
    assert fields.of_refusal("stream/TROUPE_WF_ns_w", "invalid subject") == "spec.trigger.subject"
    assert (
        fields.of_refusal("consumer/TROUPE_WF_ns_w/engine_triggers", "max_ack_pending too high")
        == "spec.maxConcurrentRuns"
    )
