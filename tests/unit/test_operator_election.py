"""Leader election without a cluster: the pure rules (``builders.lease``), and the elector
(``clients.lease``) over an in-memory Lease with compare-and-swap, so that a simulated
schedule of attempts, pauses, partitions and crashes can check that two never act."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from troupe_operator.builders import lease as rules
from troupe_operator.builders.lease import (
    ElectionTimings,
    LeaseRecord,
    Observation,
    ObservedLease,
)
from troupe_operator.clients.lease import (
    Attempt,
    LeaderElector,
    LeaseConflict,
    LeaseUnavailable,
)

T0 = datetime(2026, 12, 1, 12, 0, 0, 123456, tzinfo=UTC)
TIMINGS = ElectionTimings(lease_duration=10, renew_deadline=7.0, retry_period=2.0)
FAST = ElectionTimings(lease_duration=2, renew_deadline=0.6, retry_period=0.1)


def record(holder: str = "a", duration: int = 10, transitions: int = 0) -> LeaseRecord:
    return LeaseRecord(holder, duration, T0, T0, transitions)


def seen(lease_record: LeaseRecord, since: float = 100.0, version: str = "1") -> Observation:
    return Observation(ObservedLease(lease_record, version), since)


# --- the rules -----------------------------------------------------------------------------


def test_a_lease_reads_as_the_api_server_returns_it() -> None:
    body = {
        "metadata": {"name": "troupe-operator", "resourceVersion": "42"},
        "spec": {
            "holderIdentity": "op-1_ab12",
            "leaseDurationSeconds": 10,
            "acquireTime": "2026-12-01T12:00:00.123456Z",
            "renewTime": "2026-12-01T12:00:04.000000Z",
            "leaseTransitions": 3,
        },
    }
    observed = rules.read_lease(body)
    assert observed.resource_version == "42"
    assert observed.record == LeaseRecord(
        "op-1_ab12", 10, T0, datetime(2026, 12, 1, 12, 0, 4, tzinfo=UTC), 3
    )


def test_a_lease_without_a_spec_reads_as_released() -> None:
    assert rules.read_lease({"metadata": {}}).record == LeaseRecord("", 0, None, None, 0)


def test_the_manifest_writes_micro_times_and_the_version_it_read() -> None:
    manifest = rules.lease_manifest("troupe-system", "troupe-operator", record(), "7")
    assert manifest["metadata"]["resourceVersion"] == "7"
    assert manifest["spec"] == {
        "holderIdentity": "a",
        "leaseDurationSeconds": 10,
        "leaseTransitions": 0,
        "acquireTime": "2026-12-01T12:00:00.123456Z",
        "renewTime": "2026-12-01T12:00:00.123456Z",
    }
    assert "resourceVersion" not in rules.lease_manifest("ns", "n", record())["metadata"]


def test_a_held_lease_may_be_taken_only_a_lease_duration_after_it_last_changed() -> None:
    observation = seen(record("a"), since=100.0)
    assert not rules.may_acquire(observation, "b", 109.9)
    assert rules.may_acquire(observation, "b", 110.0)


def test_the_holder_may_always_renew_and_anyone_may_take_a_released_lease() -> None:
    assert rules.may_acquire(seen(record("a")), "a", 100.0)
    assert rules.may_acquire(seen(record("")), "b", 100.0)


def test_the_expiry_clock_restarts_only_when_the_lease_changes() -> None:
    first = rules.observe(None, ObservedLease(record("a"), "1"), 100.0)
    same = rules.observe(first, ObservedLease(record("a"), "1"), 105.0)
    renewed = rules.observe(same, ObservedLease(record("a"), "2"), 106.0)
    assert same.since == 100.0
    assert renewed.since == 106.0


def test_a_first_claim_creates_the_record() -> None:
    assert rules.claimed(None, "a", 10, T0) == LeaseRecord("a", 10, T0, T0, 0)


def test_a_renewal_keeps_the_acquire_time_and_the_transitions() -> None:
    later = T0 + timedelta(seconds=2)
    assert rules.claimed(record("a", transitions=2), "a", 10, later) == LeaseRecord(
        "a", 10, T0, later, 2
    )


def test_a_takeover_counts_a_transition_even_of_a_released_lease() -> None:
    later = T0 + timedelta(seconds=12)
    taken = rules.claimed(record("a", transitions=2), "b", 10, later)
    assert taken == LeaseRecord("b", 10, later, later, 3)
    released = rules.released(taken, later)
    assert released == LeaseRecord("", rules.RELEASED_LEASE_SECONDS, later, later, 3)
    assert rules.claimed(released, "a", 10, later).transitions == 4


def test_the_holder_must_stop_a_renew_deadline_after_its_last_renewal() -> None:
    assert not rules.renew_overdue(100.0, TIMINGS, 106.9)
    assert rules.renew_overdue(100.0, TIMINGS, 107.0)


@pytest.mark.parametrize(
    ("duration", "deadline", "retry"), [(10, 10.0, 2.0), (10, 7.0, 7.0), (10, 7.0, 0.0)]
)
def test_timings_where_a_holder_could_outlive_its_lease_are_refused(
    duration: int, deadline: float, retry: float
) -> None:
    with pytest.raises(ValueError, match="renew deadline < lease duration"):
        ElectionTimings(duration, deadline, retry)


MOMENTS = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
RECORDS = st.builds(
    LeaseRecord,
    holder=st.text(max_size=40),
    lease_duration=st.integers(0, 2**31 - 1),
    acquire_time=st.none() | MOMENTS,
    renew_time=st.none() | MOMENTS,
    transitions=st.integers(0, 2**31 - 1),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(RECORDS, st.text(max_size=20))
def test_a_record_survives_the_round_trip_through_its_manifest(
    lease_record: LeaseRecord, version: str
) -> None:
    manifest = rules.lease_manifest("ns", "name", lease_record, version)
    assert rules.read_lease(manifest) == ObservedLease(lease_record, version)


@given(st.dictionaries(st.sampled_from(["spec", "metadata", "kind"]), JSON))
def test_any_body_reads_as_a_record_never_a_crash(body: dict[str, Any]) -> None:
    observed = rules.read_lease(body)
    assert observed.record.lease_duration >= 0
    assert observed.record.transitions >= 0


@given(
    RECORDS,
    st.text(max_size=5),
    st.floats(0, 1e6),
    st.floats(0, 1e3),
    st.floats(0, 1e3),
)
def test_once_a_lease_may_be_taken_it_stays_so(
    lease_record: LeaseRecord, identity: str, since: float, wait: float, more: float
) -> None:
    observation = seen(lease_record, since)
    if rules.may_acquire(observation, identity, since + wait):
        assert rules.may_acquire(observation, identity, since + wait + more)


@given(RECORDS, st.text(max_size=5), MOMENTS)
def test_every_claim_names_the_claimant_and_never_loses_a_transition(
    lease_record: LeaseRecord, identity: str, now: datetime
) -> None:
    claim = rules.claimed(lease_record, identity, 10, now)
    assert (claim.holder, claim.renew_time, claim.lease_duration) == (identity, now, 10)
    assert claim.transitions == lease_record.transitions + (lease_record.holder != identity)


# --- the elector over an in-memory Lease ---------------------------------------------------


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class MemoryLease:
    """The API server's side: one Lease, written only at the version it was read at; a write
    that changes nothing keeps the version, as the API server's no-op updates do."""

    namespace: str = "troupe-system"
    name: str = "troupe-operator"
    stored: ObservedLease | None = None
    version: int = 0
    unreachable: set[str] = field(default_factory=set)

    def lock_for(self, identity: str) -> MemoryLock:
        return MemoryLock(self, identity)

    def write(self, lease_record: LeaseRecord) -> ObservedLease:
        if self.stored is None or self.stored.record != lease_record:
            self.version += 1
            self.stored = ObservedLease(lease_record, str(self.version))
        return self.stored


@dataclass
class MemoryLock:
    """One replica's connection to the Lease: it can be cut (``unreachable``)."""

    server: MemoryLease
    identity: str
    namespace: str = "troupe-system"
    name: str = "troupe-operator"

    def _reachable(self) -> None:
        if self.identity in self.server.unreachable:
            raise LeaseUnavailable("connection refused")

    def read(self, timeout: float) -> ObservedLease | None:
        self._reachable()
        return self.server.stored

    def create(self, lease_record: LeaseRecord, timeout: float) -> ObservedLease:
        self._reachable()
        if self.server.stored is not None:
            raise LeaseConflict("AlreadyExists")
        return self.server.write(lease_record)

    def replace(
        self, lease_record: LeaseRecord, resource_version: str, timeout: float
    ) -> ObservedLease:
        self._reachable()
        stored = self.server.stored
        if stored is None or stored.resource_version != resource_version:
            raise LeaseConflict("Conflict")
        return self.server.write(lease_record)


def wall(clock: Clock) -> datetime:
    return T0 + timedelta(seconds=clock.now)


def elector(server: MemoryLease, identity: str, clock: Clock) -> LeaderElector:
    lock = server.lock_for(identity)
    return LeaderElector(lock, identity, TIMINGS, monotonic=clock, wall=lambda: wall(clock))


def test_the_first_replica_creates_the_lease_and_the_second_stands_by() -> None:
    server, clock = MemoryLease(), Clock()
    first, second = elector(server, "a", clock), elector(server, "b", clock)

    assert first.try_acquire_or_renew(1.0) is Attempt.HELD
    assert second.try_acquire_or_renew(1.0) is Attempt.TAKEN
    assert server.stored is not None
    assert server.stored.record.holder == "a"
    assert (first.leading, second.leading) == (True, False)


def test_a_standby_takes_over_a_lease_duration_after_the_holder_fell_silent() -> None:
    server, clock = MemoryLease(), Clock()
    first, second = elector(server, "a", clock), elector(server, "b", clock)
    first.try_acquire_or_renew(1.0)
    second.try_acquire_or_renew(1.0)

    clock.now += TIMINGS.lease_duration - 0.1
    assert second.try_acquire_or_renew(1.0) is Attempt.TAKEN
    clock.now += 0.1
    assert second.try_acquire_or_renew(1.0) is Attempt.HELD
    assert server.stored is not None
    assert (server.stored.record.holder, server.stored.record.transitions) == ("b", 1)


def test_a_holder_that_keeps_renewing_keeps_the_standby_waiting() -> None:
    server, clock = MemoryLease(), Clock()
    first, second = elector(server, "a", clock), elector(server, "b", clock)
    first.try_acquire_or_renew(1.0)
    for _ in range(30):
        clock.now += TIMINGS.retry_period
        assert first.try_acquire_or_renew(1.0) is Attempt.HELD
        assert second.try_acquire_or_renew(1.0) is Attempt.TAKEN
    assert server.stored is not None
    assert server.stored.record.renew_time == wall(clock)
    assert server.stored.record.acquire_time == T0 + timedelta(seconds=1000.0)


def test_a_released_lease_is_taken_on_the_next_try() -> None:
    server, clock = MemoryLease(), Clock()
    first, second = elector(server, "a", clock), elector(server, "b", clock)
    first.try_acquire_or_renew(1.0)
    second.try_acquire_or_renew(1.0)

    assert first.release()
    assert server.stored is not None
    assert server.stored.record.holder == ""
    assert second.try_acquire_or_renew(1.0) is Attempt.HELD


def test_release_leaves_a_lease_held_by_another_alone() -> None:
    server, clock = MemoryLease(), Clock()
    first = elector(server, "a", clock)
    first.try_acquire_or_renew(1.0)
    server.write(record("b"))

    assert not first.release()
    assert server.stored is not None
    assert server.stored.record.holder == "b"


def test_a_standby_is_ready_only_while_it_reaches_the_api_server() -> None:
    server, clock = MemoryLease(), Clock()
    server.write(record("a"))
    standby = elector(server, "b", clock)
    assert not standby.in_contact()
    standby.try_acquire_or_renew(1.0)
    assert standby.in_contact()
    server.unreachable.add("b")
    clock.now += TIMINGS.lease_duration
    assert standby.try_acquire_or_renew(1.0) is Attempt.FAILED
    assert not standby.in_contact()


def _hold_until_lost(server: MemoryLease, after_acquiring: Callable[[], object]) -> list[str]:
    """Acquire as "a", let ``after_acquiring`` spoil things, renew until the holder gives up;
    return why, once it gave up no sooner than its renew deadline."""
    holder = LeaderElector(server.lock_for("a"), "a", FAST)
    assert holder.try_acquire_or_renew(1.0) is Attempt.HELD
    after_acquiring()
    reasons: list[str] = []
    done = threading.Event()

    def lost(reason: str) -> None:
        reasons.append(reason)
        done.set()

    holder.start_holding(lost)
    assert done.wait(5.0), "the holder never gave up"
    holder.release()
    return reasons


def test_a_holder_that_cannot_renew_gives_up_at_its_renew_deadline() -> None:
    server = MemoryLease()
    started = time.monotonic()
    reasons = _hold_until_lost(server, lambda: server.unreachable.add("a"))
    assert time.monotonic() - started >= FAST.renew_deadline
    assert reasons == ["could not renew the lease troupe-system/troupe-operator for 0.6s"]


def test_a_holder_that_finds_another_holder_gives_up_at_once() -> None:
    server = MemoryLease()
    reasons = _hold_until_lost(server, lambda: server.write(record("intruder")))
    assert reasons == ["the lease troupe-system/troupe-operator is held by intruder now"]
    assert server.stored is not None
    assert server.stored.record.holder == "intruder"


# A schedule: which replicas try (one, or all in turn, as each does every retry period), how
# far the clock moves, whose connection drops or comes back, which replica crashes (and
# restarts with a new identity).
REPLICA = st.integers(0, 2)
ACTIONS = st.one_of(
    st.tuples(st.just("try"), REPLICA),
    st.tuples(st.just("round"), st.permutations([0, 1, 2])),
    st.tuples(st.just("cut"), REPLICA),
    st.tuples(st.just("mend"), REPLICA),
    st.tuples(st.just("crash"), REPLICA),
)
PAUSES = st.sampled_from([0.0, 0.5, 2.0, 2.0, 3.0, 6.5, 7.0, 9.9, 10.0, 12.0]) | st.floats(0, 12)
STEPS = st.lists(st.tuples(PAUSES, ACTIONS), max_size=40)


@settings(max_examples=200)
@given(STEPS)
def test_two_replicas_never_act_at_once(steps: list[tuple[float, tuple[str, Any]]]) -> None:
    """A replica acts from its first successful claim until its renew deadline passes
    unrenewed or it finds another holder (then it exits, as the renewer makes it)."""
    server, clock = MemoryLease(), Clock()
    generation = [0, 0, 0]

    def replica(i: int) -> LeaderElector:
        identity = f"r{i}-{generation[i]}"
        wall = lambda: T0 + timedelta(seconds=clock.now)  # noqa: E731
        return LeaderElector(
            server.lock_for(identity), identity, TIMINGS, monotonic=clock, wall=wall
        )

    replicas = [replica(i) for i in range(3)]
    exited = [False, False, False]

    def acting(i: int) -> bool:
        renewed_at = replicas[i].renewed_at
        if exited[i] or renewed_at is None:
            return False
        if rules.renew_overdue(renewed_at, TIMINGS, clock.now):
            exited[i] = True  # the renewer exits at its deadline, before anything else happens
        return not exited[i]

    def check() -> None:
        assert sum(acting(i) for i in range(3)) <= 1, [r.identity for r in replicas]

    for pause, (action, value) in steps:
        clock.now += pause
        check()
        if action in ("try", "round"):
            for i in [value] if action == "try" else value:
                leading = replicas[i].leading
                if not exited[i] and replicas[i].try_acquire_or_renew(1.0) is Attempt.TAKEN:
                    exited[i] = leading  # a holder that finds another holder exits
                check()
        elif action == "cut":
            server.unreachable.add(replicas[value].identity)
        elif action == "mend":
            server.unreachable.discard(replicas[value].identity)
        elif action == "crash":
            generation[value] += 1
            replicas[value] = replica(value)
            exited[value] = False
