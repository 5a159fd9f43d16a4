"""Autoscaling an Agent on its backlog: the pure decision, the validation of the policy, who
owns ``spec.replicas``, and the ScaledObject generated for KEDA."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from troupe_operator.api import AgentSpec
from troupe_operator.api.agent import AgentAutoscale
from troupe_operator.builders import autoscale, workload
from troupe_operator.builders.autoscale import Backlog, plan_replicas
from troupe_operator.builders.pods import FIELD_MANAGER, Owner

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
LONG_AGO = NOW - timedelta(hours=1)
OWNER = Owner(namespace="research", name="summariser", uid="0b1c2d3e-0000-4000-8000-000000000001")


def _policy(**fields: Any) -> AgentAutoscale:
    return AgentAutoscale.model_validate(
        {"minReplicas": 0, "maxReplicas": 5, "targetPending": 10, **fields}
    )


def _backlog(
    pending: int = 0, ack_pending: int = 0, last_active: datetime | None = LONG_AGO
) -> Backlog:
    return Backlog(pending, ack_pending, last_active)


def test_lag_above_the_target_scales_out_to_ceil_lag_over_target() -> None:
    decision = plan_replicas(_policy(), 1, _backlog(pending=21, ack_pending=4), NOW, None)
    assert (decision.desired, decision.lag, decision.reason) == (3, 25, autoscale.SCALED_UP)


def test_scaling_out_stops_at_max_replicas() -> None:
    assert plan_replicas(_policy(), 2, _backlog(pending=10_000), NOW, None).desired == 5


def test_an_idle_agent_with_min_zero_scales_to_zero() -> None:
    decision = plan_replicas(_policy(scaleToZeroAfter="30s"), 1, _backlog(), NOW, None)
    assert (decision.desired, decision.reason) == (0, autoscale.SCALED_TO_ZERO)


def test_a_recent_delivery_keeps_one_replica_until_the_idle_period_passes() -> None:
    recent = _backlog(last_active=NOW - timedelta(seconds=10))
    policy = _policy(scaleToZeroAfter="30s")
    assert plan_replicas(policy, 1, recent, NOW, None).desired == 1
    assert plan_replicas(policy, 1, recent, NOW + timedelta(seconds=20), None).desired == 0


def test_a_recent_scale_change_counts_as_activity_for_the_idle_period() -> None:
    policy = _policy(scaleToZeroAfter="30s")
    assert plan_replicas(policy, 1, _backlog(), NOW, NOW - timedelta(seconds=5)).desired == 1


def test_the_first_pending_message_scales_from_zero() -> None:
    decision = plan_replicas(_policy(), 0, _backlog(pending=1), NOW, None)
    assert (decision.desired, decision.reason) == (1, autoscale.SCALED_FROM_ZERO)


def test_an_agent_at_zero_without_backlog_stays_at_zero() -> None:
    recent = _backlog(last_active=NOW)
    assert not plan_replicas(_policy(), 0, recent, NOW, NOW).changes


def test_min_replicas_holds_without_backlog() -> None:
    assert plan_replicas(_policy(minReplicas=2), 4, _backlog(), NOW, None).desired == 2


def test_scaling_down_waits_for_the_delay_after_the_last_change() -> None:
    policy = _policy(minReplicas=1, scaleDownDelay="1m")
    just_scaled = NOW - timedelta(seconds=30)
    assert plan_replicas(policy, 4, _backlog(pending=5), NOW, just_scaled).desired == 4
    assert plan_replicas(policy, 4, _backlog(pending=5), NOW, LONG_AGO).desired == 1


def test_a_count_above_a_lowered_max_comes_down_at_once() -> None:
    policy = _policy(maxReplicas=2, scaleDownDelay="1h")
    assert plan_replicas(policy, 6, _backlog(pending=100), NOW, NOW).desired == 2


@given(
    min_replicas=st.integers(0, 20),
    spread=st.integers(0, 20),
    target=st.integers(1, 1000),
    current=st.integers(0, 60),
    pending=st.integers(0, 100_000),
    ack_pending=st.integers(0, 1000),
    idle_seconds=st.integers(0, 7200),
    scaled_seconds=st.none() | st.integers(0, 7200),
)
def test_every_decision_stays_in_bounds_and_never_leaves_a_backlog_without_a_pod(
    min_replicas: int,
    spread: int,
    target: int,
    current: int,
    pending: int,
    ack_pending: int,
    idle_seconds: int,
    scaled_seconds: int | None,
) -> None:
    policy = _policy(
        minReplicas=min_replicas, maxReplicas=max(1, min_replicas + spread), targetPending=target
    )
    backlog = _backlog(pending, ack_pending, NOW - timedelta(seconds=idle_seconds))
    scaled_at = None if scaled_seconds is None else NOW - timedelta(seconds=scaled_seconds)
    decision = plan_replicas(policy, current, backlog, NOW, scaled_at)
    assert policy.min_replicas <= decision.desired <= policy.max_replicas
    if backlog.lag > 0:
        assert decision.desired >= 1
    if decision.desired > current:
        # Scaling up is to exactly what the lag asks for (within the bounds).
        wanted = math.ceil(backlog.lag / target)
        assert decision.desired == min(max(wanted, policy.min_replicas, 1), policy.max_replicas)
    assert decision.changes == (decision.desired != current)
    # The same facts give the same decision: an operator restart decides the same.
    assert plan_replicas(policy, current, backlog, NOW, scaled_at) == decision


@given(st.integers(0, 1000), st.integers(0, 1000))
def test_more_lag_never_asks_for_fewer_replicas(lag: int, more: int) -> None:
    policy = _policy(minReplicas=1, maxReplicas=50, targetPending=7)
    fewer = plan_replicas(policy, 3, _backlog(pending=lag), NOW, None).desired
    assert plan_replicas(policy, 3, _backlog(pending=lag + more), NOW, None).desired >= fewer


def test_min_above_max_is_refused() -> None:
    with pytest.raises(ValidationError, match="may not exceed maxReplicas"):
        _policy(minReplicas=6, maxReplicas=5)


@pytest.mark.parametrize(
    "fields", [{"targetPending": 0}, {"maxReplicas": 0}, {"scaleToZeroAfter": "0s"}]
)
def test_policies_that_can_never_work_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        _policy(**fields)


def _spec(runtime: dict[str, Any]) -> AgentSpec:
    return AgentSpec.model_validate({"role": "r", "runtime": runtime})


def test_an_autoscaled_deployment_leaves_replicas_out_and_a_fixed_one_sets_them() -> None:
    autoscaled = _spec({"replicas": 3, "autoscale": {"minReplicas": 0, "maxReplicas": 4}})
    fixed = _spec({"replicas": 3})
    for spec, replicas in ((autoscaled, None), (fixed, 3)):
        config = workload.build_runtime_config(OWNER, spec, "nats://nats:4222")
        deployment = workload.build_deployment(OWNER, spec, config)
        assert deployment["spec"].get("replicas") == replicas
    # The consumers are sized for the most pods there may be.
    assert workload.most_replicas(autoscaled) == 4
    assert workload.most_replicas(fixed) == 3


def _managed(*entries: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "metadata": {
            "managedFields": [
                {"manager": manager, "operation": "Apply", "fieldsV1": fields}
                for manager, fields in entries
            ]
        }
    }


def test_replica_owners_are_read_from_managed_fields() -> None:
    deployment = _managed(
        (FIELD_MANAGER, {"f:spec": {"f:template": {}}}),
        (autoscale.AUTOSCALER_MANAGER, {"f:spec": {"f:replicas": {}}}),
        ("kube-controller-manager", {"f:spec": {"f:replicas": {}}}),
        ("garbage", "not a mapping"),  # type: ignore[arg-type]
    )
    assert autoscale.replica_owners(deployment) == [
        autoscale.AUTOSCALER_MANAGER,
        "kube-controller-manager",
    ]
    assert autoscale.foreign_owners(deployment) == ["kube-controller-manager"]
    assert autoscale.foreign_owners(None) == []


def test_the_scale_time_annotation_round_trips_and_garbage_reads_as_none() -> None:
    manifest = autoscale.replicas_manifest("ns", "agent", 2, NOW)
    assert manifest["spec"] == {"replicas": 2}
    assert autoscale.scaled_at(manifest) == NOW
    broken = {"metadata": {"annotations": {autoscale.SCALED_AT_ANNOTATION: "yesterday"}}}
    assert autoscale.scaled_at(broken) is None


def test_the_scaled_object_has_one_nats_jetstream_trigger_per_priority_consumer() -> None:
    policy = _policy(minReplicas=0, maxReplicas=4, scaleToZeroAfter="2m", scaleDownDelay="2h")
    scaled = autoscale.build_scaled_object(
        OWNER,
        policy,
        "summariser",
        {"troupe.dev/agent": "summariser"},
        "TROUPE_research_summariser",
        ["summariser_p0", "summariser_p1"],
        "nats://nats.troupe-system:4222",
    )
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "summariser",
    }
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["cooldownPeriod"]) == (0, 4, 120)
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == autoscale.HPA_WINDOW_MAX
    assert [t["metadata"]["consumer"] for t in spec["triggers"]] == [
        "summariser_p0",
        "summariser_p1",
    ]
    trigger = spec["triggers"][0]
    assert trigger["type"] == "nats-jetstream"
    assert trigger["metadata"]["natsServerMonitoringEndpoint"] == "nats.troupe-system:8222"
    assert trigger["metadata"]["lagThreshold"] == "10"
    assert scaled["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid


def test_targets_reads_the_scale_target_of_an_hpa() -> None:
    hpa = {"spec": {"scaleTargetRef": {"kind": "Deployment", "name": "summariser"}}}
    assert autoscale.targets(hpa, "summariser")
    assert not autoscale.targets(hpa, "writer")
    assert not autoscale.targets({"spec": {"scaleTargetRef": "junk"}}, "summariser")


def _decision(desired: int, lag: int = 0) -> autoscale.ScaleDecision:
    return autoscale.ScaleDecision(1, desired, lag, autoscale.SCALED_UP)


def test_the_autoscaled_advisory_says_who_sets_replicas_and_why() -> None:
    native, keda = _policy(), _policy(engine="keda")
    hpa = "HorizontalPodAutoscaler web"
    cases = [
        (native, _decision(2, lag=15), None, False, (True, "Scaling")),
        (native, _decision(0), None, False, (True, autoscale.SCALED_TO_ZERO)),
        (native, None, hpa, False, (False, autoscale.SCALED_EXTERNALLY)),
        (None, None, hpa, False, (True, autoscale.SCALED_EXTERNALLY)),
        (keda, None, None, False, (False, autoscale.KEDA_MISSING)),
        (keda, None, None, True, (True, "ScaledByKeda")),
        # KEDA's own HPA is the expected owner of replicas under engine keda.
        (keda, None, "HorizontalPodAutoscaler keda-hpa-x", True, (True, "ScaledByKeda")),
    ]
    for policy, decision, scaled_by, served, (ok, reason) in cases:
        observed = autoscale.observation(policy, decision, scaled_by, served, "x")
        assert observed is not None
        assert (observed.ok, observed.reason) == (ok, reason)
    assert "lag 15: 2 replicas wanted" in str(
        autoscale.observation(native, _decision(2, lag=15), None, False, "x")
    )
    # Nothing to say: no autoscale and no HPA, or a native pass that read no lag.
    assert autoscale.observation(None, None, None, True, "x") is None
    assert autoscale.observation(native, None, None, False, "x") is None


def test_the_autoscale_status_keeps_the_last_decision_when_none_was_taken() -> None:
    native = _policy()
    taken = autoscale.status(native, _decision(3, lag=25), None, NOW, None)
    assert taken is not None
    assert (taken.desired_replicas, taken.lag, taken.last_scale_time) == (
        3,
        25,
        "2026-12-03T12:00:00Z",
    )
    assert autoscale.status(native, None, None, None, taken) == taken
    assert autoscale.status(None, _decision(3), None, NOW, taken) is None
