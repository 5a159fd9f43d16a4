"""The pass skeleton never leaves an object without a status: a refused spec, a plan's
problems, a foreign object, an API server refusal and an unexpected exception each end in
a written status and an Event, against an in-memory API."""

from __future__ import annotations

import asyncio
import copy
import logging
from datetime import datetime
from typing import Any, cast

from troupe_operator.api import AgentSpec, AgentStatus
from troupe_operator.builders import status
from troupe_operator.builders.pods import Owner
from troupe_operator.builders.problems import Problem
from troupe_operator.builders.status import WorkloadObservation
from troupe_operator.clients.kube import Cause, Kube, Rejected
from troupe_operator.clients.nats import NatsPool
from troupe_operator.handlers import redact_logs
from troupe_operator.reconcilers.common import (
    CLEANED_KEPT,
    Kind,
    Operator,
    Plan,
    Seen,
    refresh,
    run_pass,
)
from troupe_operator.settings import OperatorSettings

UID = "uid-1"


class FakeKube:
    """The calls a pass makes, over dicts: objects by (kind, name), the Agent's body."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[tuple[str, str, str]] = []
        self.refuse: Rejected | None = None

    async def read_custom(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.body)

    async def patch_status(
        self, plural: str, namespace: str, name: str, patch: dict[str, Any], version: str
    ) -> None:
        self.body["status"] = status_after(self.body.get("status") or {}, patch)

    async def create_event(
        self, regarding: dict[str, str], type: str, reason: str, message: str
    ) -> None:
        self.events.append((type, reason, message))

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return None

    async def config_map_keys(self, namespace: str, name: str) -> set[str] | None:
        return None

    async def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, name))

    async def read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get(("Deployment", name))

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        if self.refuse is not None:
            raise self.refuse
        applied = {**manifest, "metadata": {**manifest["metadata"], "generation": 1}}
        self.objects[(manifest["kind"], manifest["metadata"]["name"])] = applied
        return applied

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        self.objects.pop((kind, name), None)

    async def list_pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        return []


def status_after(previous: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    merged = dict(previous)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = status_after(merged[key], value)
        else:
            merged[key] = value
    return merged


class ScriptedKind(Kind[AgentSpec, AgentStatus]):
    """An Agent-like kind whose plan is what a test sets."""

    name = "Agent"
    plural = "agents"
    label = "test"
    spec_model = AgentSpec
    status_model = AgentStatus
    subconditions = status.AGENT_SUBCONDITIONS

    def __init__(self, plan: Plan[AgentStatus, Any] | Exception) -> None:
        self._plan = plan

    async def plan(
        self, operator: Operator, owner: Owner, spec: AgentSpec, generation: int
    ) -> Plan[AgentStatus, Any]:
        if isinstance(self._plan, Exception):
            raise self._plan
        return self._plan

    def workload(self, name: str) -> str:
        return name

    def refreshable(self, previous: AgentStatus) -> bool:
        return True

    def refreshed(
        self, previous: AgentStatus, workload: WorkloadObservation, now: datetime
    ) -> AgentStatus:
        return previous

    async def delete(
        self, operator: Operator, namespace: str, name: str, spec: Any, raw: Any
    ) -> list[str]:
        return []

    def leftovers(self, namespace: str, name: str) -> list[str]:
        return []


def _body(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "team",
            "name": "writer",
            "uid": UID,
            "generation": 2,
            "resourceVersion": "1",
        },
        "spec": spec,
    }


def _operator(kube: FakeKube) -> Operator:
    return Operator(cast(Kube, kube), NatsPool(), OperatorSettings())


def _agent_status(seen: Seen[AgentStatus, Any]) -> AgentStatus:
    return status.agent_status(
        seen.previous, 2, seen.now, seen.workload, missing_secrets=seen.missing_secrets
    )


def _conditions(kube: FakeKube) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in kube.body["status"]["conditions"]}


DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "writer", "namespace": "team", "ownerReferences": [{"uid": UID}]},
    "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "runtime"}]}}},
}


async def test_a_refused_spec_is_written_as_spec_invalid_and_not_retried() -> None:
    kube = FakeKube(_body({"role": "r", "runtime": {"env": [{"name": ""}]}}))

    blocked = await run_pass(_operator(kube), ScriptedKind(AssertionError("no plan")), kube.body)

    assert blocked is None
    conditions = _conditions(kube)
    assert conditions["Stalled"]["reason"] == "SpecInvalid"
    assert "spec.runtime.env[0].name" in conditions["Stalled"]["message"]
    assert kube.body["status"]["observedGeneration"] == 2
    assert ("Warning", "SpecInvalid") in [(t, r) for t, r, _ in kube.events]


async def test_an_exception_becomes_reconcile_failed_and_is_retried() -> None:
    kube = FakeKube(_body({"role": "r"}))
    failing = ScriptedKind(RuntimeError("lost nats://u:pw@h:4222"))

    blocked = await run_pass(_operator(kube), failing, kube.body)

    assert blocked is not None
    conditions = _conditions(kube)
    assert (conditions["Reconciling"]["status"], conditions["Reconciling"]["reason"]) == (
        "True",
        "ReconcileFailed",
    )
    assert conditions["Stalled"]["status"] == "False"
    assert "pw" not in conditions["Ready"]["message"]


async def test_problems_stall_and_nothing_is_applied() -> None:
    kube = FakeKube(_body({"role": "r"}))
    plan = Plan[AgentStatus, Any](
        _agent_status,
        apply=[DEPLOYMENT],
        problems=[Problem("spec.contract.inputSchema", "InvalidSchema", "not a schema")],
    )

    assert await run_pass(_operator(kube), ScriptedKind(plan), kube.body) is None

    assert kube.objects == {}
    assert _conditions(kube)["SpecValid"]["reason"] == "InvalidSchema"
    assert _conditions(kube)["Stalled"]["status"] == "True"


async def test_a_foreign_object_is_not_applied_and_stalls_as_object_conflict() -> None:
    kube = FakeKube(_body({"role": "r"}))
    foreign = {"kind": "Deployment", "metadata": {"name": "writer", "generation": 7}}
    kube.objects[("Deployment", "writer")] = foreign
    plan = Plan[AgentStatus, Any](_agent_status, apply=[DEPLOYMENT])

    assert await run_pass(_operator(kube), ScriptedKind(plan), kube.body) is None

    assert kube.objects[("Deployment", "writer")] is foreign
    conditions = _conditions(kube)
    assert conditions["WorkloadAvailable"]["reason"] == "ObjectConflict"
    assert conditions["Stalled"]["reason"] == "ObjectConflict"


async def test_an_api_server_refusal_names_the_spec_field() -> None:
    raw = {"role": "r", "runtime": {"sidecars": [{"name": "proxy", "image": "e"}]}}
    kube = FakeKube(_body(raw))
    kube.refuse = Rejected(
        "Deployment",
        "writer",
        "invalid",
        [Cause("spec.template.spec.containers[1].image", "Required value")],
    )
    manifest = copy.deepcopy(DEPLOYMENT)
    manifest["spec"]["template"]["spec"]["containers"].append({"name": "proxy", "image": "e"})
    plan = Plan[AgentStatus, Any](_agent_status, apply=[manifest])

    await run_pass(_operator(kube), ScriptedKind(plan), kube.body)

    stalled = _conditions(kube)["Stalled"]
    assert stalled["reason"] == "ObjectRejected"
    assert (
        "spec.runtime.sidecars[0].image: the API server refused Deployment writer"
        in (stalled["message"])
    )


async def test_an_object_changed_outside_troupe_is_restored_with_an_event() -> None:
    kube = FakeKube(_body({"role": "r"}))
    plan = Plan[AgentStatus, Any](_agent_status, apply=[DEPLOYMENT])
    await run_pass(_operator(kube), ScriptedKind(plan), kube.body)
    kube.objects[("Deployment", "writer")]["metadata"]["generation"] = 5

    await run_pass(_operator(kube), ScriptedKind(plan), kube.body)

    assert ("Normal", "DriftCorrected") in [(t, r) for t, r, _ in kube.events]


def test_log_records_are_redacted(caplog: Any) -> None:
    redact_logs()
    redact_logs()

    with caplog.at_level(logging.INFO):
        logging.getLogger("troupe.test").info("NATS at %s failed", "nats://u:pw@h:4222")

    assert caplog.records[-1].getMessage() == "NATS at nats://***@h:4222 failed"


async def test_a_refresh_during_a_pass_waits_for_it_instead_of_being_lost() -> None:
    """A Deployment event while a first pass runs must see that pass's status, not none."""
    kube = FakeKube(_body({"role": "writes"}))
    reads: list[str] = []
    read_custom = kube.read_custom

    async def counted(plural: str, namespace: str, name: str) -> dict[str, Any]:
        reads.append(name)
        return await read_custom(plural, namespace, name)

    kube.read_custom = counted  # type: ignore[method-assign]
    operator = _operator(kube)
    kind = ScriptedKind(Plan(_agent_status))
    async with operator.lock(kind.name, "team", "writer"):
        waiting = asyncio.create_task(refresh(operator, kind, "team", "writer"))
        for _ in range(20):
            await asyncio.sleep(0)
        assert reads == []
        assert not waiting.done()
    await asyncio.wait_for(waiting, timeout=5)
    assert reads == ["writer"]


async def test_a_pass_over_an_object_whose_resources_were_deleted_writes_nothing() -> None:
    """A resync pass planned from a listing taken before the deletion would provision
    the deleted object's streams and buckets again, and nothing would remove them."""
    kube = FakeKube(_body({"role": "r"}))
    operator = _operator(kube)
    operator.mark_cleaned(UID)

    blocked = await run_pass(operator, ScriptedKind(AssertionError("planned")), kube.body)

    assert blocked is None
    assert "status" not in kube.body
    assert kube.events == []


def test_the_cleaned_uids_are_bounded_and_forget_the_oldest_first() -> None:
    operator = _operator(FakeKube(_body({})))
    for n in range(CLEANED_KEPT + 3):
        operator.mark_cleaned(f"uid-{n}")

    assert len(operator.cleaned) == CLEANED_KEPT
    assert "uid-0" not in operator.cleaned
    assert f"uid-{CLEANED_KEPT + 2}" in operator.cleaned
