"""A cron window that falls while the operator is down: RunOnce fires it once when the
operator is back (within startingDeadline), Skip records it handled and fires nothing. The
module runs an operator of its own, stopped and started by the test."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests.integration.operator_support import (
    API_VERSION,
    OperatorProcess,
    agent,
    apply,
    get,
    install_crds,
    jetstream,
)
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_operator.builders.trigger import ON_TIME
from troupe_runtime.contract import naming, triggers
from troupe_runtime.contract.triggers import CronSource, FireLedger

DEADLINE = 60.0
SCHEDULE = "* * * * * */30"
"""Windows 30 s apart: the operator, back 11 s after one, looks before the next."""


def _trigger(name: str, missed: str) -> dict[str, Any]:
    cron = {"schedule": SCHEDULE, "missedRuns": missed, "startingDeadline": "1m"}
    return {
        "apiVersion": API_VERSION,
        "kind": "Trigger",
        "metadata": {"name": name},
        "spec": {"target": {"kind": "Agent", "name": "echo"}, "source": {"cron": cron}},
    }


def _ledger(nats_url: str, namespace: str, name: str) -> FireLedger | None:
    async def read(js: JetStreamContext) -> bytes | None:
        try:
            kv = await js.key_value(naming.trigger_fires_bucket(namespace))
            return (await kv.get(name)).value
        except NotFoundError:
            return None

    stored = jetstream(nats_url, read)
    return None if stored is None else FireLedger.model_validate_json(stored)


def _inbox_ids(nats_url: str, namespace: str) -> set[str]:
    async def read(js: JetStreamContext) -> set[str]:
        stream = naming.inbox_stream(namespace, "echo")
        info = await js.stream_info(stream)
        ids = set()
        for seq in range(max(info.state.first_seq, 1), info.state.last_seq + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except NotFoundError:
                continue
            ids.add((msg.headers or {}).get("Nats-Msg-Id", ""))
        return ids

    return jetstream(nats_url, read)


def _directory_lists_echo(nats_url: str, namespace: str) -> bool:
    async def read(js: JetStreamContext) -> bool:
        try:
            kv = await js.key_value(naming.directory_bucket(namespace))
            await kv.get(naming.directory_key("Agent", "echo"))
        except NotFoundError:
            return False
        return True

    return jetstream(nats_url, read)


def test_a_window_missed_while_the_operator_was_down(
    cluster: ClusterEndpoints, namespace: str, tmp_path: Path
) -> None:
    install_crds(cluster)
    process = OperatorProcess(cluster, tmp_path / "operator.log")
    process.start()
    try:
        apply(cluster, namespace, agent("echo"))
        wait_for(
            lambda: _directory_lists_echo(cluster.nats_url, namespace),
            DEADLINE,
            "the Agent in the directory",
        )
        process.stop()

        apply(cluster, namespace, _trigger("once", "RunOnce"))
        apply(cluster, namespace, _trigger("skip", "Skip"))
        created = datetime.fromisoformat(
            get(cluster, namespace, "trigger", "skip")["metadata"]["creationTimestamp"].replace(
                "Z", "+00:00"
            )
        )
        missed = triggers.next_fire(CronSource(schedule=SCHEDULE), created)
        # The condition is the clock: the window is past, and late by more than ON_TIME.
        wait_for(
            lambda: datetime.now(UTC) > missed + ON_TIME,
            DEADLINE,
            f"the window {missed} missed while the operator is down",
        )
        process.start()

        once = wait_for(
            lambda: (
                (found := _ledger(cluster.nats_url, namespace, "once")) and found.fires and found
            ),
            DEADLINE,
            "the RunOnce Trigger's fire",
        )
        skip = wait_for(
            lambda: (
                (found := _ledger(cluster.nats_url, namespace, "skip"))
                and found.last_scheduled_time
                and found
            ),
            DEADLINE,
            "the Skip Trigger's window handled",
        )

        uid_once = get(cluster, namespace, "trigger", "once")["metadata"]["uid"]
        uid_skip = get(cluster, namespace, "trigger", "skip")["metadata"]["uid"]
        # Read as soon as seen; the next window may have fired on time since.
        assert once.last_scheduled_time is not None
        assert once.last_scheduled_time >= missed
        assert skip.last_scheduled_time is not None
        assert skip.last_scheduled_time >= missed
        ids = _inbox_ids(cluster.nats_url, namespace)
        assert triggers.fire_id(uid_once, missed) in ids
        assert triggers.fire_id(uid_skip, missed) not in ids
    finally:
        if not process.alive():
            process.start()
        cluster.kubectl(
            "delete", "-n", namespace, "triggers,agents", "--all", "--wait=true", "--timeout=45s"
        )
        process.stop()
