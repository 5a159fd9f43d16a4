"""The Trigger's pure planning: which cron windows fire, the concurrency policy, the
definition written only when it differs, the subject stream's bounds, and the status (a
missing target waited for, a bad spec stalled, the ledger copied without secrets, an idle
pass the same status again)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from troupe_operator.api.trigger import TriggerStatus
from troupe_operator.builders import trigger as builders
from troupe_operator.builders.problems import Problem
from troupe_runtime.contract import naming
from troupe_runtime.contract.triggers import CronSource, FireLedger, TriggerSpec

NOW = datetime(2026, 12, 3, 8, 30, 1, tzinfo=UTC)
MINUTELY = CronSource(schedule="* * * * *")
OK = builders.Messaging("nats://nats:4222")


def spec(source: dict[str, object], **more: object) -> TriggerSpec:
    return TriggerSpec.model_validate(
        {"target": {"kind": "Workflow", "name": "research"}, "source": source, **more}
    )


def condition(status: TriggerStatus, kind: str) -> tuple[str, str]:
    found = next(c for c in status.conditions if c.type == kind)
    return found.status, found.reason


# Which windows fire.


def test_the_window_just_due_fires() -> None:
    plan = builders.cron_plan(MINUTELY, NOW - timedelta(minutes=1), NOW)

    assert plan.fire == [datetime(2026, 12, 3, 8, 30, tzinfo=UTC)]
    assert plan.handled == plan.fire[0]


def test_nothing_is_due_before_the_next_window() -> None:
    plan = builders.cron_plan(MINUTELY, datetime(2026, 12, 3, 8, 30, tzinfo=UTC), NOW)

    assert plan.idle


def test_windows_missed_in_a_pause_are_skipped_but_handled() -> None:
    plan = builders.cron_plan(MINUTELY, NOW - timedelta(hours=1), NOW + timedelta(seconds=30))

    assert plan.fire == []
    assert plan.handled == datetime(2026, 12, 3, 8, 30, tzinfo=UTC)


def test_run_once_fires_the_latest_missed_window_within_its_deadline() -> None:
    cron = CronSource(
        schedule="* * * * *", missed_runs="RunOnce", starting_deadline=timedelta(minutes=1)
    )
    later = NOW + timedelta(seconds=30)

    plan = builders.cron_plan(cron, NOW - timedelta(hours=1), later)

    assert plan.fire == [datetime(2026, 12, 3, 8, 30, tzinfo=UTC)]


def test_run_once_past_its_deadline_fires_nothing() -> None:
    cron = CronSource(
        schedule="0 * * * *", missed_runs="RunOnce", starting_deadline=timedelta(minutes=10)
    )

    plan = builders.cron_plan(cron, NOW - timedelta(days=1), NOW)

    assert plan.fire == []
    assert plan.handled == datetime(2026, 12, 3, 8, 0, tzinfo=UTC)


def test_the_cron_resumes_after_the_ledger_else_from_creation() -> None:
    created = NOW - timedelta(days=3)
    handled = NOW - timedelta(minutes=2)

    assert builders.since(None, created) == created
    assert builders.since(FireLedger(), created) == created
    assert builders.since(FireLedger(last_scheduled_time=handled), created) == handled


@pytest.mark.parametrize(
    ("policy", "kind", "active", "action"),
    [
        ("Allow", "Workflow", True, "fire"),
        ("Forbid", "Workflow", True, "skip"),
        ("Forbid", "Workflow", False, "fire"),
        ("Replace", "Workflow", True, "replace"),
        ("Replace", "Workflow", False, "fire"),
        ("Forbid", "Agent", True, "fire"),
        ("Replace", "Agent", True, "fire"),
    ],
)
def test_the_concurrency_policy(policy: str, kind: str, active: bool, action: str) -> None:
    cron = CronSource(schedule="* * * * *", concurrency_policy=policy)  # type: ignore[arg-type]

    assert builders.concurrency_action(cron, kind, "trg-run", active) == action  # type: ignore[arg-type]


def test_a_first_fire_has_no_run_to_wait_for() -> None:
    cron = CronSource(schedule="* * * * *", concurrency_policy="Forbid")

    assert builders.concurrency_action(cron, "Workflow", None, True) == "fire"


# What is written to NATS.


def test_the_definition_is_written_only_when_it_differs() -> None:
    wanted = builders.definition(
        "team", "nightly", "uid-1", 2, spec({"cron": {"schedule": "0 0 * * *"}})
    )
    encoded = builders.encode_definition(wanted)

    assert builders.definition_to_write(wanted, encoded) is None
    assert builders.definition_to_write(wanted, None) == encoded
    assert builders.definition_to_write(wanted, b"junk") == encoded
    older = wanted.model_copy(update={"generation": 1})
    assert builders.definition_to_write(wanted, builders.encode_definition(older)) == encoded


def test_the_subject_stream_and_its_consumer_are_bounded() -> None:
    stream = builders.stream_config("team", "orders", "orders.*")
    consumer = builders.consumer_config()

    assert stream.name == naming.trigger_stream("team", "orders")
    assert stream.subjects == ["orders.*"]
    assert stream.max_age == 24 * 3600
    assert stream.max_msgs
    assert stream.max_bytes
    assert consumer.durable_name == naming.TRIGGER_RELAY_CONSUMER
    assert consumer.ack_policy is not None
    assert consumer.ack_policy.value == "explicit"
    assert consumer.max_deliver == builders.RELAY_MAX_DELIVER


def test_a_target_entry_of_another_object_is_not_the_target() -> None:
    assert builders.target_entry("Agent", "team", "echo", None) is None
    assert builders.target_entry("Agent", "team", "echo", b"{") is None
    other = b'{"kind":"Agent","namespace":"team","name":"other","subject":"x"}'
    assert builders.target_entry("Agent", "team", "echo", other) is None
    mine = b'{"kind":"Agent","namespace":"team","name":"echo","subject":"x"}'
    assert builders.target_entry("Agent", "team", "echo", mine) is not None


# Status.


def test_a_missing_target_is_waited_for_not_stalled() -> None:
    status = builders.trigger_status(
        TriggerStatus(), 1, NOW, spec({"cron": {"schedule": "* * * * *"}}), False, OK, None
    )

    assert condition(status, "Ready") == ("False", "TargetNotFound")
    assert condition(status, "Stalled") == ("False", "Progressing")
    assert condition(status, "Reconciling") == ("True", "TargetNotFound")


def test_a_ready_cron_trigger_shows_its_next_fire_and_its_ledger() -> None:
    ledger = FireLedger(fires=3, failures=1, last_fire_time=NOW, last_failure="no stream")

    status = builders.trigger_status(
        TriggerStatus(), 4, NOW, spec({"cron": {"schedule": "* * * * *"}}), True, OK, ledger
    )

    assert condition(status, "Ready") == ("True", "Armed")
    assert status.observed_generation == 4
    assert status.next_fire_time == "2026-12-03T08:31:00Z"
    assert (status.fires, status.failures, status.last_failure) == (3, 1, "no stream")
    assert status.last_fire_time == "2026-12-03T08:30:01Z"


def test_a_suspended_trigger_has_no_next_fire() -> None:
    suspended = spec({"cron": {"schedule": "* * * * *"}}, suspend=True)

    status = builders.trigger_status(TriggerStatus(), 1, NOW, suspended, True, OK, None)

    assert condition(status, "Ready") == ("True", "Suspended")
    assert status.next_fire_time is None


def test_nats_unavailable_keeps_the_figures_and_retries() -> None:
    before = TriggerStatus(fires=7)
    down = builders.Messaging("nats://nats:4222", "timed out")

    status = builders.trigger_status(
        before, 1, NOW, spec({"webhook": {"secretRef": {"name": "s"}}}), True, down, None
    )

    assert status.fires == 7
    assert condition(status, "Ready") == ("False", "MessagingUnavailable")
    assert condition(status, "Stalled")[0] == "False"


def test_nats_unavailable_says_so_and_keeps_the_target_as_last_seen() -> None:
    """The directory was not read, so the status must not claim the target is missing."""
    cron = spec({"cron": {"schedule": "* * * * *"}})
    found = builders.trigger_status(TriggerStatus(), 1, NOW, cron, True, OK, None)
    down = builders.Messaging("nats://nats:4222", "no servers available")

    status = builders.trigger_status(found, 1, NOW, cron, None, down, None)

    assert condition(status, "Ready") == ("False", "MessagingUnavailable")
    assert condition(status, "TargetFound") == ("True", "Found")


def test_a_spec_the_models_refuse_is_stalled() -> None:
    before = builders.trigger_status(
        TriggerStatus(), 1, NOW, spec({"cron": {"schedule": "* * * * *"}}), True, OK, None
    )

    status = builders.spec_invalid_status(before, 2, NOW, "spec.source.cron.timeZone: no")

    assert condition(status, "Stalled") == ("True", "SpecInvalid")
    assert condition(status, "Ready") == ("False", "SpecInvalid")
    assert status.next_fire_time is None


SOURCES = st.one_of(
    st.builds(
        lambda s, z, sus: ({"cron": {"schedule": s, "timeZone": z}}, sus),
        st.sampled_from(["* * * * *", "*/5 * * * *", "0 0 * * *", "* * * * * */2", "0 9 * * 1-5"]),
        st.sampled_from(["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata"]),
        st.booleans(),
    ),
    st.just(({"webhook": {"secretRef": {"name": "hook"}}}, False)),
    st.builds(
        lambda s: ({"subject": {"subject": s}}, False), st.sampled_from(["a.b", "orders.*", "x.>"])
    ),
)
LEDGERS = st.one_of(
    st.none(),
    st.builds(
        FireLedger,
        fires=st.integers(0, 10**9),
        failures=st.integers(0, 10**9),
        last_fire_time=st.one_of(st.none(), st.just(NOW)),
        last_failure=st.text(max_size=600),
    ),
)


@given(SOURCES, LEDGERS, st.booleans(), st.booleans(), st.integers(1, 10**6))
def test_an_idle_pass_plans_nothing_to_write(
    source: tuple[dict[str, object], bool],
    ledger: FireLedger | None,
    found: bool,
    up: bool,
    generation: int,
) -> None:
    """The same spec, target and ledger at the same time: the definition stored is kept and
    the status written is the status planned (no patch)."""
    given_spec = spec(source[0], suspend=source[1])
    messaging = OK if up else builders.Messaging("nats://nats:4222", "down")
    wanted = builders.definition("team", "t", "uid", generation, given_spec)
    first = builders.trigger_status(
        TriggerStatus(), generation, NOW, given_spec, found, messaging, ledger
    )
    again = builders.trigger_status(first, generation, NOW, given_spec, found, messaging, ledger)

    assert builders.definition_to_write(wanted, builders.encode_definition(wanted)) is None
    assert again.model_dump(by_alias=True, exclude_none=True) == first.model_dump(
        by_alias=True, exclude_none=True
    )


SECRET_URLS = st.builds(
    lambda user, password, host: f"nats://{user}:{password}@{host}:4222",
    st.text("abcdefghij", min_size=1, max_size=8),
    st.text("klmnopqrst0123", min_size=6, max_size=12),
    st.sampled_from(["nats", "nats.troupe.svc"]),
)


@given(SECRET_URLS, st.text(max_size=100))
def test_status_never_shows_a_url_secret_from_the_ledger(url: str, said: str) -> None:
    password = url.split(":")[2].split("@")[0]
    ledger = FireLedger(failures=1, last_failure=f"{said} publishing to {url} failed")

    status = builders.trigger_status(
        TriggerStatus(), 1, NOW, spec({"webhook": {"secretRef": {"name": "s"}}}), True, OK, ledger
    )

    assert password not in status.model_dump_json().replace(said, "")


@settings(deadline=None)
@given(st.integers(0, 6 * 3600), st.sampled_from(["* * * * *", "*/5 * * * *", "* * * * * */2"]))
def test_a_window_handled_is_never_planned_again(offset: int, schedule: str) -> None:
    """Once a plan's latest window is recorded, the same look plans nothing more."""
    cron = CronSource(schedule=schedule)
    plan = builders.cron_plan(cron, NOW - timedelta(seconds=offset), NOW)
    if plan.handled is None:
        return
    assert all(w <= plan.handled for w in plan.fire)
    assert builders.cron_plan(cron, plan.handled, NOW).idle


def test_a_run_not_projected_yet_is_pending_only_shortly_after_its_fire() -> None:
    fired = FireLedger(fires=1, last_fire_time=NOW, last_task_id="trg-u-1")

    assert builders.pending(fired, NOW + timedelta(seconds=5))
    assert not builders.pending(fired, NOW + builders.PENDING_GRACE + timedelta(seconds=1))
    assert not builders.pending(FireLedger(), NOW)


def test_a_subject_jetstream_refuses_stalls_on_messaging() -> None:
    problem = Problem("spec.source.subject.subject", "SubjectConflict", "overlaps stream X")

    status = builders.rejected_status(TriggerStatus(), 1, NOW, [problem])

    assert condition(status, "Stalled") == ("True", "SubjectConflict")
    assert condition(status, "MessagingReady") == ("False", "SubjectConflict")
    assert condition(status, "SpecValid") == ("True", "SpecValid")
