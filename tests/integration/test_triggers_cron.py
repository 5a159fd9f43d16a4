"""Triggers against the real API server, operator and nats-server: a cron Trigger with a
seconds field fires into its Agent's inbox (each fire a task record of its own) and status
counts the fires; suspend stops them; a missing target is waited for, not stalled; what the
API server admits but the models refuse (a cron expression, a time zone, JMESPath) is
Stalled naming the field; the definition the gateway reads is filed and removed with the
Trigger; a subject Trigger's stream and relay consumer come and go with it; an idle pass
writes nothing; a Workflow target's Forbid skips while the last run is active, and Replace
cancels it."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy
from nats.js.errors import NotFoundError

from tests.integration.operator_support import (
    API_VERSION,
    OperatorProcess,
    agent,
    apply,
    condition,
    consumer_config,
    explained,
    get,
    jetstream,
    stream_config,
    wait_ready,
    workflow,
)
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_runtime.contract import naming, triggers
from troupe_runtime.contract.gateway import TaskRecord
from troupe_runtime.contract.run_state import RunState
from troupe_runtime.contract.triggers import FireLedger, TriggerDefinition

DEADLINE = 45.0
EVERY_TWO_SECONDS = "* * * * * */2"


def trigger(name: str, source: dict[str, Any], target: str = "echo", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Trigger",
        "metadata": {"name": name},
        "spec": {"target": {"kind": "Agent", "name": target}, "source": source, **spec},
    }


WEBHOOK = {"webhook": {"secretRef": {"name": "hook-secret"}}}


@pytest.fixture
def watched(cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess) -> Iterator[str]:
    """The test's namespace, with the operator running; its log printed on failure."""
    with explained(cluster, namespace, operator):
        yield namespace


def _kv_get(nats_url: str, bucket: str, key: str) -> bytes | None:
    async def read(js: JetStreamContext) -> bytes | None:
        try:
            return (await (await js.key_value(bucket)).get(key)).value
        except NotFoundError:
            return None

    return jetstream(nats_url, read)


def _revision(nats_url: str, bucket: str, key: str) -> int | None:
    async def read(js: JetStreamContext) -> int | None:
        try:
            return (await (await js.key_value(bucket)).get(key)).revision
        except NotFoundError:
            return None

    return jetstream(nats_url, read)


def _ledger(nats_url: str, namespace: str, name: str) -> FireLedger | None:
    stored = _kv_get(nats_url, naming.trigger_fires_bucket(namespace), name)
    return None if stored is None else FireLedger.model_validate_json(stored)


def _inbox_ids(nats_url: str, namespace: str, agent_name: str) -> list[str]:
    """The message ids of everything stored in the Agent's inbox stream, oldest first."""

    async def read(js: JetStreamContext) -> list[str]:
        stream = naming.inbox_stream(namespace, agent_name)
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            return []
        ids = []
        for seq in range(max(info.state.first_seq, 1), info.state.last_seq + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except NotFoundError:
                continue
            ids.append((msg.headers or {}).get("Nats-Msg-Id", ""))
        return ids

    return jetstream(nats_url, read)


def _status(cluster: ClusterEndpoints, namespace: str, name: str, test: Any, what: str) -> Any:
    def found() -> dict[str, Any] | None:
        body = get(cluster, namespace, "trigger", name)
        return body if test(body) else None

    return wait_for(found, DEADLINE, what)


def _is(body: dict[str, Any], kind: str, status: str, reason: str | None = None) -> bool:
    found = condition(body, kind)
    return (
        found is not None
        and found["status"] == status
        and (reason is None or found["reason"] == reason)
    )


def _passes(operator: OperatorProcess) -> float:
    """Trigger passes the operator made so far, from its own metrics."""
    with urllib.request.urlopen(operator.metrics_url, timeout=5) as response:
        text = response.read().decode()
    found = re.findall(
        r'^troupe_operator_reconciles_total\{kind="Trigger",result="ok"\} (\S+)$', text, re.M
    )
    return float(found[0]) if found else 0.0


def test_a_cron_trigger_fires_into_the_agents_inbox_and_counts_in_status(
    cluster: ClusterEndpoints, watched: str
) -> None:
    apply(cluster, watched, agent("echo"))
    apply(cluster, watched, trigger("tick", {"cron": {"schedule": EVERY_TWO_SECONDS}}))

    ids = wait_for(
        lambda: (
            (found := _inbox_ids(cluster.nats_url, watched, "echo")) and len(found) >= 2 and found
        ),
        DEADLINE,
        "two fires in the Agent's inbox",
    )
    body = _status(
        cluster,
        watched,
        "tick",
        lambda b: (b.get("status") or {}).get("fires", 0) >= 2 and _is(b, "Ready", "True"),
        "two fires in status and Ready",
    )

    uid = body["metadata"]["uid"]
    assert all(i.startswith(f"trg-{uid}-") for i in ids), ids
    assert len(set(ids)) == len(ids)
    assert (condition(body) or {})["reason"] == "Armed"
    status = body["status"]
    assert status["lastFireTime"].endswith("Z")
    assert datetime.fromisoformat(status["nextFireTime"].replace("Z", "+00:00")) > (
        datetime.now(UTC) - timedelta(seconds=10)
    )
    # Each fire is a task any gateway can read: filed under its id, by the Trigger.
    stored = _kv_get(
        cluster.nats_url, naming.tasks_bucket(watched), naming.task_key("Agent", "echo", ids[0])
    )
    assert stored is not None
    record = TaskRecord.model_validate_json(stored)
    assert (record.task_id, record.caller) == (ids[0], "trigger:tick")
    assert set(record.input) == {"scheduledTime"}


def test_suspend_stops_the_fires(cluster: ClusterEndpoints, watched: str) -> None:
    apply(cluster, watched, agent("echo"))
    apply(cluster, watched, trigger("tick", {"cron": {"schedule": EVERY_TWO_SECONDS}}))
    wait_for(
        lambda: len(_inbox_ids(cluster.nats_url, watched, "echo")) >= 1,
        DEADLINE,
        "a first fire",
    )

    apply(
        cluster,
        watched,
        trigger("tick", {"cron": {"schedule": EVERY_TWO_SECONDS}}, suspend=True),
    )
    body = _status(
        cluster,
        watched,
        "tick",
        lambda b: _is(b, "Ready", "True", "Suspended") and "nextFireTime" not in b["status"],
        "Ready Suspended without a next fire",
    )
    # The pass that wrote Suspended read the spec under the Trigger's lock: a fire that
    # began before it has ended, and none begins after.
    ledger = _ledger(cluster.nats_url, watched, "tick")
    fired = len(_inbox_ids(cluster.nats_url, watched, "echo"))
    # A second Trigger on the same schedule is the clock: three of its windows fired while
    # the first was suspended, so the cron loop looked at it at least as often.
    apply(cluster, watched, agent("other"))
    apply(cluster, watched, trigger("clock", {"cron": {"schedule": EVERY_TWO_SECONDS}}, "other"))
    wait_for(
        lambda: len(_inbox_ids(cluster.nats_url, watched, "other")) >= 3,
        DEADLINE,
        "three fires of the clock Trigger",
    )

    assert _ledger(cluster.nats_url, watched, "tick") == ledger
    assert len(_inbox_ids(cluster.nats_url, watched, "echo")) == fired
    assert ledger is not None
    assert body["status"]["fires"] == ledger.fires


def test_a_missing_target_is_waited_for_then_ready(cluster: ClusterEndpoints, watched: str) -> None:
    apply(cluster, watched, trigger("hook", WEBHOOK, target="later"))

    body = _status(
        cluster,
        watched,
        "hook",
        lambda b: _is(b, "Ready", "False", "TargetNotFound"),
        "Ready False TargetNotFound",
    )
    assert _is(body, "Stalled", "False")
    assert _is(body, "Reconciling", "True", "TargetNotFound")
    stored = _kv_get(
        cluster.nats_url, naming.directory_bucket(watched), triggers.directory_key("hook")
    )
    assert stored is not None
    definition = TriggerDefinition.model_validate_json(stored)
    assert (definition.name, definition.uid) == ("hook", body["metadata"]["uid"])
    assert definition.spec.source.webhook is not None

    apply(cluster, watched, agent("later"))

    body = _status(cluster, watched, "hook", lambda b: _is(b, "Ready", "True"), "Ready")
    assert "nextFireTime" not in body["status"]


@pytest.mark.parametrize(
    ("source", "spec", "field"),
    [
        ({"cron": {"schedule": "every day at noon"}}, {}, "spec.source.cron.schedule"),
        (
            {"cron": {"schedule": "0 12 * * *", "timeZone": "Mars/Olympus_Mons"}},
            {},
            "spec.source.cron.timeZone",
        ),
        (WEBHOOK, {"input": "payload.[["}, "spec.input"),
    ],
    ids=["cron", "time-zone", "jmespath"],
)
def test_what_the_api_server_admits_and_the_models_refuse_is_stalled(
    cluster: ClusterEndpoints,
    watched: str,
    source: dict[str, Any],
    spec: dict[str, Any],
    field: str,
) -> None:
    apply(cluster, watched, trigger("bad", source, **spec))

    body = _status(
        cluster,
        watched,
        "bad",
        lambda b: _is(b, "Stalled", "True", "SpecInvalid"),
        "Stalled SpecInvalid",
    )

    assert _is(body, "Ready", "False", "SpecInvalid")
    assert field in (condition(body, "Stalled") or {})["message"]
    assert "nextFireTime" not in body["status"]
    # Nothing was filed for the gateway from a spec it could not run.
    assert (
        _kv_get(cluster.nats_url, naming.directory_bucket(watched), triggers.directory_key("bad"))
        is None
    )


def test_deleting_a_trigger_removes_its_definition(cluster: ClusterEndpoints, watched: str) -> None:
    bucket, key = naming.directory_bucket(watched), triggers.directory_key("doomed")
    apply(cluster, watched, trigger("doomed", WEBHOOK))
    wait_for(lambda: _kv_get(cluster.nats_url, bucket, key), DEADLINE, "the definition")

    cluster.kubectl("delete", "-n", watched, "trigger", "doomed", "--wait=true", "--timeout=45s")

    assert _kv_get(cluster.nats_url, bucket, key) is None


def test_a_subject_trigger_gets_its_stream_and_consumer_and_they_go_with_it(
    cluster: ClusterEndpoints, watched: str
) -> None:
    subject = f"ext.{watched}.orders.*"
    stream = naming.trigger_stream(watched, "orders")
    apply(cluster, watched, trigger("orders", {"subject": {"subject": subject}}))

    found = wait_for(
        lambda: stream_config(cluster.nats_url, stream), DEADLINE, "the Trigger's stream"
    )
    assert found.subjects == [subject]
    assert 0 < (found.max_age or 0) <= 24 * 3600
    assert (found.max_msgs or 0) > 0
    consumer = wait_for(
        lambda: consumer_config(cluster.nats_url, stream, naming.TRIGGER_RELAY_CONSUMER),
        DEADLINE,
        "the relay consumer",
    )
    assert consumer.ack_policy == AckPolicy.EXPLICIT
    assert 0 < (consumer.max_deliver or 0) <= 10
    _status(cluster, watched, "orders", lambda b: _is(b, "Ready", "False"), "a status")

    cluster.kubectl("delete", "-n", watched, "trigger", "orders", "--wait=true", "--timeout=45s")

    assert stream_config(cluster.nats_url, stream) is None


def test_an_idle_pass_writes_nothing(
    cluster: ClusterEndpoints, watched: str, operator: OperatorProcess
) -> None:
    apply(cluster, watched, agent("echo"))
    apply(cluster, watched, trigger("idle", WEBHOOK))
    _status(cluster, watched, "idle", lambda b: _is(b, "Ready", "True"), "Ready")
    # kopf writes its own bookkeeping right after the first pass: wait for two more.
    settled = _passes(operator) + 2
    wait_for(lambda: _passes(operator) >= settled, DEADLINE, "two Trigger passes")
    first = get(cluster, watched, "trigger", "idle")
    bucket, key = naming.directory_bucket(watched), triggers.directory_key("idle")
    stored = _revision(cluster.nats_url, bucket, key)
    passes = _passes(operator)

    wait_for(lambda: _passes(operator) >= passes + 3, DEADLINE, "three more Trigger passes")

    later = get(cluster, watched, "trigger", "idle")
    assert later["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    assert _revision(cluster.nats_url, bucket, key) == stored


def _run(nats_url: str, namespace: str, workflow_name: str, run_id: str) -> RunState | None:
    stored = _kv_get(nats_url, naming.workflow_runs_bucket(namespace, workflow_name), run_id)
    return None if stored is None else RunState.model_validate_json(stored)


def _waiting_workflow(cluster: ClusterEndpoints, namespace: str) -> None:
    """A Workflow whose one step goes to an Agent on kwok: its runs wait for good."""
    apply(cluster, namespace, agent("slow"))
    apply(cluster, namespace, workflow("wf", [{"name": "only", "agentRef": "slow"}]))
    wait_ready(cluster, namespace, "workflow", "wf")


def _workflow_trigger(policy: str) -> dict[str, Any]:
    manifest = trigger(
        "tick", {"cron": {"schedule": EVERY_TWO_SECONDS, "concurrencyPolicy": policy}}, "wf"
    )
    manifest["spec"]["target"]["kind"] = "Workflow"
    return manifest


def test_forbid_skips_the_fires_while_the_last_run_is_active(
    cluster: ClusterEndpoints, watched: str
) -> None:
    _waiting_workflow(cluster, watched)
    apply(cluster, watched, _workflow_trigger("Forbid"))
    first = wait_for(
        lambda: (found := _ledger(cluster.nats_url, watched, "tick")) and found.fires and found,
        DEADLINE,
        "the first fire",
    )
    assert first.last_task_id is not None
    assert first.last_scheduled_time is not None
    wait_for(
        lambda: (run := _run(cluster.nats_url, watched, "wf", first.last_task_id or "")) and run,
        DEADLINE,
        "the first fire's run",
    )
    handled = first.last_scheduled_time + timedelta(seconds=6)

    # Three windows later, each handled and skipped: the run still waits for its Agent.
    later = wait_for(
        lambda: (
            (found := _ledger(cluster.nats_url, watched, "tick"))
            and (found.last_scheduled_time or handled) > handled
            and found
        ),
        DEADLINE,
        "three more windows handled",
    )
    assert (later.fires, later.last_task_id) == (1, first.last_task_id)
    run = _run(cluster.nats_url, watched, "wf", first.last_task_id)
    assert run is not None
    assert run.status == "Running"


def test_replace_cancels_the_last_run_before_it_fires(
    cluster: ClusterEndpoints, watched: str
) -> None:
    _waiting_workflow(cluster, watched)
    apply(cluster, watched, _workflow_trigger("Replace"))
    first = wait_for(
        lambda: (found := _ledger(cluster.nats_url, watched, "tick")) and found.fires and found,
        DEADLINE,
        "the first fire",
    )
    assert first.last_task_id is not None

    cancelled = wait_for(
        lambda: (
            (run := _run(cluster.nats_url, watched, "wf", first.last_task_id or ""))
            and run.status == "Cancelled"
            and run
        ),
        DEADLINE,
        "the first run cancelled by the next fire",
    )

    assert cancelled.run_id == first.last_task_id
    ledger = _ledger(cluster.nats_url, watched, "tick")
    assert ledger is not None
    assert ledger.fires >= 2


def test_a_subject_another_trigger_captures_is_stalled_naming_the_field(
    cluster: ClusterEndpoints, watched: str
) -> None:
    subject = f"ext.{watched}.shared"
    apply(cluster, watched, trigger("first", {"subject": {"subject": subject}}))
    wait_for(
        lambda: stream_config(cluster.nats_url, naming.trigger_stream(watched, "first")),
        DEADLINE,
        "the first Trigger's stream",
    )

    apply(cluster, watched, trigger("second", {"subject": {"subject": subject}}))

    body = _status(
        cluster,
        watched,
        "second",
        lambda b: _is(b, "Stalled", "True", "SubjectConflict"),
        "Stalled SubjectConflict",
    )
    message = (condition(body, "Stalled") or {})["message"]
    assert "spec.source.subject.subject" in message
    assert naming.trigger_stream(watched, "first") in message
    assert stream_config(cluster.nats_url, naming.trigger_stream(watched, "second")) is None
