"""The naming grammar: distinct roots per kind, names that never collide, read back."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st

from troupe_runtime.contract import naming
from troupe_runtime.contract.naming import StreamOwner

LABEL = r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?"
labels = st.from_regex(LABEL, fullmatch=True)
agent_names = labels.filter(lambda name: not name.endswith(naming.ENGINE_SUFFIX))
run_ids = st.one_of(labels, st.sampled_from(["in", "p0", "dlq", "agents", "workflows", "logs"]))


def test_subjects_have_a_root_per_kind() -> None:
    assert naming.inbox_subject("shop", "wf", 2) == "troupe.shop.agents.wf.in.p2"
    assert naming.dead_letter_subject("shop", "wf") == "troupe.shop.agents.wf.dlq"
    assert (
        naming.workflow_subject("shop", "in", "start", "r1") == "troupe.shop.workflows.in.start.r1"
    )
    assert naming.event_log_subject("shop", "r1") == "troupe.shop.logs.r1"


def test_buckets_are_named_by_purpose() -> None:
    assert naming.kv_bucket("shop", "ratelimits") == "troupe_shop_state_ratelimits"
    assert naming.rate_limit_bucket("shop") == "troupe_shop_ratelimits"
    assert naming.workflow_runs_bucket("shop", "order") == "troupe_shop_wf_order_runs"


def test_kubernetes_objects_are_named_by_kind() -> None:
    assert (
        naming.agent_deployment("a"),
        naming.agent_service_account("a"),
        naming.agent_config_map("a"),
    ) == ("a", "a", "a-runtime")
    assert (naming.engine_deployment("w"), naming.engine_config_map("w")) == (
        "w-engine",
        "w-engine",
    )


def test_the_own_inbox_pattern_covers_every_namespace() -> None:
    assert naming.subject_matches(naming.own_inbox_pattern("a"), naming.inbox_subject("x", "a", 0))
    assert not naming.subject_matches(
        naming.own_inbox_pattern("a"), naming.inbox_subject("x", "b", 0)
    )


def test_stream_names_read_back_to_their_owner() -> None:
    cases = {
        naming.inbox_stream("shop", "a"): StreamOwner("Agent", "shop", "a"),
        naming.dead_letter_stream("shop", "a"): StreamOwner("Agent", "shop", "a"),
        naming.advisory_stream("shop", "a"): StreamOwner("Agent", "shop", "a"),
        naming.workflow_stream("shop", "w"): StreamOwner("Workflow", "shop", "w"),
        naming.workflow_dead_letter_stream("shop", "w"): StreamOwner("Workflow", "shop", "w"),
        naming.kv_stream(naming.workflow_runs_bucket("shop", "w")): StreamOwner(
            "Workflow", "shop", "w"
        ),
        naming.event_log_stream("shop"): StreamOwner("Namespace", "shop", "event log"),
        naming.kv_stream(naming.rate_limit_bucket("shop")): StreamOwner(
            "Namespace", "shop", "rate limits"
        ),
        naming.kv_stream(naming.kv_bucket("shop", "b")): StreamOwner(
            "Namespace", "shop", "state bucket b"
        ),
        naming.kv_stream(naming.chaos_bucket("shop")): StreamOwner(
            "Namespace", "shop", "chaos faults"
        ),
    }
    for stream, owner in cases.items():
        assert naming.stream_owner(stream) == owner, stream
    assert str(cases[naming.workflow_stream("shop", "w")]) == "Workflow shop/w"


def test_streams_not_troupes_have_no_owner() -> None:
    for stream in ("ORDERS", "TROUPE_Shop_a", "KV_other", "TROUPE_a_b_c", "KV_troupe_x_y"):
        assert naming.stream_owner(stream) is None, stream


def _agent_subjects(namespace: str, agent: str) -> list[str]:
    return [
        *(naming.inbox_subject(namespace, agent, p) for p in range(10)),
        naming.dead_letter_subject(namespace, agent),
    ]


def _workflow_subjects(namespace: str, workflow: str, run: str) -> list[str]:
    return [
        naming.workflow_subject(namespace, workflow, kind, run) for kind in naming.WORKFLOW_KINDS
    ]


def _owners(namespace: str, agent: str, workflow: str, run: str) -> dict[str, list[str]]:
    """Every subject of one agent, one workflow and the event logs of a namespace, by owner:
    literal ones (a run id in place of a workflow's wildcard) and the streams' patterns."""
    return {
        f"agent {namespace}/{agent}": [
            *_agent_subjects(namespace, agent),
            naming.inbox_wildcard(namespace, agent),
        ],
        f"workflow {namespace}/{workflow}": [
            *_workflow_subjects(namespace, workflow, run),
            *_workflow_subjects(namespace, workflow, "*"),
        ],
        f"logs {namespace}": [
            naming.event_log_subject(namespace, run),
            naming.event_log_subject(namespace, "*"),
        ],
    }


def _apart(first: list[str], second: list[str]) -> bool:
    """No subject of one matches a pattern (or equals a subject) of the other."""
    return not any(
        naming.subject_matches(a, b) or naming.subject_matches(b, a) for a in first for b in second
    )


@given(labels, agent_names, agent_names, labels, labels, run_ids)
def test_subjects_of_different_objects_in_a_namespace_never_overlap(
    namespace: str, agent: str, other_agent: str, workflow: str, other_workflow: str, run: str
) -> None:
    owners = _owners(namespace, agent, workflow, run)
    if other_agent != agent:
        owners[f"agent {other_agent}"] = _agent_subjects(namespace, other_agent)
    if other_workflow != workflow:
        owners[f"workflow {other_workflow}"] = _workflow_subjects(namespace, other_workflow, run)
    names = list(owners)
    for index, first in enumerate(names):
        for second in names[index + 1 :]:
            assert _apart(owners[first], owners[second]), (first, second)


@given(labels, labels, agent_names, labels, run_ids)
def test_one_objects_subjects_never_overlap_across_namespaces(
    namespace: str, other: str, agent: str, workflow: str, run: str
) -> None:
    assume(namespace != other)
    here, there = _owners(namespace, agent, workflow, run), _owners(other, agent, workflow, run)
    for owner, subjects in here.items():
        for other_subjects in there.values():
            assert _apart(subjects, other_subjects), owner


@given(labels, agent_names, labels, labels)
def test_stream_and_bucket_names_never_collide(
    namespace: str, agent: str, workflow: str, bucket: str
) -> None:
    streams = [
        naming.inbox_stream(namespace, agent),
        naming.dead_letter_stream(namespace, agent),
        naming.advisory_stream(namespace, agent),
        naming.workflow_stream(namespace, workflow),
        naming.workflow_dead_letter_stream(namespace, workflow),
        naming.event_log_stream(namespace),
        naming.kv_stream(naming.kv_bucket(namespace, bucket)),
        naming.kv_stream(naming.rate_limit_bucket(namespace)),
        naming.kv_stream(naming.workflow_runs_bucket(namespace, workflow)),
        naming.kv_stream(naming.chaos_bucket(namespace)),
    ]
    assert len(set(streams)) == len(streams)
    assert all(naming.stream_owner(stream) is not None for stream in streams)
    assert naming.stream_owner(naming.inbox_stream(namespace, agent)) == StreamOwner(
        "Agent", namespace, agent
    )
    assert naming.stream_owner(naming.workflow_stream(namespace, workflow)) == StreamOwner(
        "Workflow", namespace, workflow
    )


@given(labels, labels, agent_names, labels)
def test_bucket_names_of_two_namespaces_never_collide(
    namespace: str, other: str, bucket: str, workflow: str
) -> None:
    assume(namespace != other)
    here = {
        naming.kv_bucket(namespace, bucket),
        naming.rate_limit_bucket(namespace),
        naming.workflow_runs_bucket(namespace, workflow),
    }
    there = {
        naming.kv_bucket(other, bucket),
        naming.rate_limit_bucket(other),
        naming.workflow_runs_bucket(other, workflow),
    }
    assert not here & there


@given(agent_names, agent_names, labels)
def test_kubernetes_names_never_collide_across_kinds(
    agent: str, other_agent: str, workflow: str
) -> None:
    """Per Kubernetes kind, the names of two Agents and a Workflow are distinct."""
    agents = {agent, other_agent}
    deployments = [naming.agent_deployment(a) for a in agents]
    deployments.append(naming.engine_deployment(workflow))
    config_maps = [naming.agent_config_map(a) for a in agents]
    config_maps.append(naming.engine_config_map(workflow))
    assert len(set(deployments)) == len(deployments)
    assert len(set(config_maps)) == len(config_maps)
