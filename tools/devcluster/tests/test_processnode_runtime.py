"""The process node's pure runtime rules: IPs, probes' thresholds, restarts and grace."""

from __future__ import annotations

import pytest

from troupe_devcluster.processnode.ipam import IPPool, PoolExhausted
from troupe_devcluster.processnode.probes import ProbeSpec, ProbeTracker, resolve_port
from troupe_devcluster.processnode.process import exit_status
from troupe_devcluster.processnode.runtime import grace_seconds, should_restart


def test_pool_hands_out_addresses_in_order_from_the_first_host() -> None:
    pool = IPPool("127.1.0.0/16")
    assert [pool.allocate(), pool.allocate()] == ["127.1.0.1", "127.1.0.2"]


def test_pool_starts_at_the_given_offset_and_wraps_around() -> None:
    pool = IPPool("127.1.0.0/29", start=5)
    assert [pool.allocate(), pool.allocate()] == ["127.1.0.6", "127.1.0.1"]


def test_pool_reuses_a_released_address_last() -> None:
    pool = IPPool("127.1.0.0/29")
    first = pool.allocate()
    pool.release(first)
    assert pool.allocate() == "127.1.0.2"


def test_pool_grants_a_free_preferred_address() -> None:
    assert IPPool("127.1.0.0/16").allocate(preferred="127.1.3.4") == "127.1.3.4"


def test_pool_ignores_a_preferred_address_outside_its_range() -> None:
    assert IPPool("127.1.0.0/16").allocate(preferred="10.0.0.1") == "127.1.0.1"


def test_pool_raises_when_exhausted() -> None:
    pool = IPPool("127.1.0.0/30")
    pool.allocate()
    pool.allocate()
    with pytest.raises(PoolExhausted):
        pool.allocate()


def test_probe_spec_fills_in_kubernetes_defaults() -> None:
    spec = ProbeSpec.parse({"httpGet": {"port": 80}})
    assert (spec.period, spec.timeout, spec.success_threshold, spec.failure_threshold) == (
        10.0,
        1.0,
        1,
        3,
    )
    assert spec.action == {"httpGet": {"port": 80}}


def test_tracker_fails_only_after_failure_threshold_consecutive_failures() -> None:
    tracker = ProbeTracker(ProbeSpec({}, failure_threshold=2), initial=True)
    tracker.observe(False)
    assert tracker.result
    tracker.observe(False)
    assert not tracker.result


def test_tracker_success_resets_the_failure_count() -> None:
    tracker = ProbeTracker(ProbeSpec({}, failure_threshold=2), initial=True)
    for outcome in (False, True, False):
        tracker.observe(outcome)
    assert tracker.result
    assert not tracker.failing


def test_tracker_passes_after_success_threshold_consecutive_successes() -> None:
    tracker = ProbeTracker(ProbeSpec({}, success_threshold=2), initial=False)
    assert not tracker.observe(True)
    assert tracker.observe(True)
    assert tracker.result


def test_named_probe_port_resolves_through_container_ports() -> None:
    assert resolve_port("http", {"http": 8080}) == 8080


def test_numeric_string_probe_port_is_a_number() -> None:
    assert resolve_port("8081", {}) == 8081


def test_unknown_named_probe_port_is_an_error() -> None:
    with pytest.raises(ValueError, match="no container port named"):
        resolve_port("grpc", {})


@pytest.mark.parametrize(
    ("policy", "exit_code", "expected"),
    [
        ("Always", 0, True),
        ("Always", 1, True),
        ("OnFailure", 0, False),
        ("OnFailure", 1, True),
        ("Never", 1, False),
    ],
)
def test_restart_follows_restart_policy(policy: str, exit_code: int, expected: bool) -> None:
    assert should_restart(policy, exit_code) is expected


def test_signal_death_is_exit_code_128_plus_signal() -> None:
    assert exit_status(-15) == (143, 15)


def test_normal_exit_has_no_signal() -> None:
    assert exit_status(3) == (3, None)


def test_grace_prefers_the_deletion_grace_period() -> None:
    pod = {
        "metadata": {"deletionGracePeriodSeconds": 5},
        "spec": {"terminationGracePeriodSeconds": 60},
    }
    assert grace_seconds(pod) == 5.0


def test_grace_falls_back_to_the_spec_then_thirty_seconds() -> None:
    assert grace_seconds({"spec": {"terminationGracePeriodSeconds": 0}}) == 0.0
    assert grace_seconds({"spec": {}}) == 30.0
