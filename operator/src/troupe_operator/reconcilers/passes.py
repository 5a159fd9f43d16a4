"""Level-based reconcilers: read the world, build the desired state, converge, report.

Each pass is idempotent: it server-side applies the built manifests, provisions
JetStream through ``troupe_runtime.nats.provision`` (which corrects drift), then
writes status with optimistic concurrency so concurrent writers never lose an
observation. A Workflow gets an engine only while it is valid (acyclic, every
agent present): an invalid one has its engine deleted, not scaled to zero, so
that "no engine Deployment" always means "nothing can run"; its runs wait in
JetStream and resume when it is fixed. ``resync_forever`` repeats every pass
periodically: kopf timers would put a finalizer on every object, and finalizers
are for NATS cleanup only.
``handlers`` calls these from kopf; they know nothing of kopf.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from troupe_operator import metrics
from troupe_operator.api import AgentSpec, AgentStatus, WorkflowSpec, WorkflowStatus
from troupe_operator.api.agent import NatsConnection
from troupe_operator.builders import dag, engine, pods, status, workload
from troupe_operator.builders.jetstream import orphaned_streams
from troupe_operator.builders.pods import Owner, SecretReference
from troupe_operator.clients.kube import Conflict, Kube
from troupe_operator.clients.nats import (
    MessagingUnavailable,
    NatsPool,
    NatsTarget,
    TlsMaterial,
)
from troupe_operator.settings import OperatorSettings
from troupe_runtime.contract.agent_resources import build_agent_resources
from troupe_runtime.contract.workflow_resources import build_workflow_resources

AGENTS = "agents"
WORKFLOWS = "workflows"
STATUS_WRITE_ATTEMPTS = 5
RESYNC_CONCURRENCY = 16
logger = logging.getLogger(__name__)


@dataclass
class Operator:
    """The clients and settings every pass shares."""

    kube: Kube
    nats: NatsPool
    settings: OperatorSettings
    locks: weakref.WeakValueDictionary[tuple[str, str, str], asyncio.Lock] = field(
        default_factory=weakref.WeakValueDictionary
    )

    def lock(self, kind: str, namespace: str, name: str) -> asyncio.Lock:
        """Serialises passes over one object (a change handler and the resync).

        Weakly held: a lock lives while a pass holds or awaits it, so deleted objects
        leave nothing behind.
        """
        return self.locks.setdefault((kind, namespace, name), asyncio.Lock())


async def _write_status(
    kube: Kube,
    plural: str,
    namespace: str,
    name: str,
    compute: Callable[[dict[str, Any]], Awaitable[BaseModel | None]],
) -> None:
    """Read, compute, compare and patch; recompute from a fresh read on a conflict.

    ``compute`` returns None when there is nothing to write.
    """
    for _ in range(STATUS_WRITE_ATTEMPTS):
        body = await kube.read_custom(plural, namespace, name)
        if body is None:
            return
        new = await compute(body)
        if new is None:
            return
        # Unset fields are left out, as the API server stores them.
        desired = new.model_dump(by_alias=True, exclude_none=True)
        previous = body.get("status") or {}
        if desired == previous:
            return
        patch = status.merge_patch(previous, desired)
        try:
            await kube.patch_status(
                plural, namespace, name, patch, body["metadata"]["resourceVersion"]
            )
        except Conflict:
            continue
        return
    raise Conflict(f"{plural}/{namespace}/{name}: status kept changing under the operator")


async def _missing_secrets(
    kube: Kube, namespace: str, references: list[SecretReference]
) -> tuple[list[str], dict[str, dict[str, bytes]]]:
    """Sentences about each absent Secret or key, and the data of the Secrets found."""
    missing: list[str] = []
    found: dict[str, dict[str, bytes]] = {}
    for reference in references:
        data = await kube.read_secret(namespace, reference.name)
        if data is None:
            missing.append(
                f"Secret {reference.name} (named by {reference.field}) does not exist in"
                f" namespace {namespace}: create it or fix the reference"
            )
        elif reference.key is not None and reference.key not in data:
            missing.append(
                f"Secret {reference.name} (named by {reference.field}) has no key {reference.key}"
            )
        else:
            found[reference.name] = data
    return missing, found


async def _required_target(
    operator: Operator, namespace: str, connection: NatsConnection, url: str
) -> NatsTarget:
    """Where to reach NATS to delete resources; only the NATS Secrets matter for that."""
    _, secrets = await _missing_secrets(operator.kube, namespace, pods.nats_secrets(connection))
    target = _nats_target(connection, url, secrets)
    if target is None:
        raise MessagingUnavailable("a Secret needed to reach NATS is missing")
    return target


def _nats_target(
    connection: NatsConnection, url: str, secrets: dict[str, dict[str, bytes]]
) -> NatsTarget | None:
    """How the operator reaches a spec's NATS, or None while a Secret it needs is missing."""
    credentials = None
    if connection.credentials_secret:
        data = secrets.get(connection.credentials_secret.name)
        if data is None:
            return None
        credentials = data[connection.credentials_secret.key].decode()
    tls = None
    if connection.tls:
        data = secrets.get(connection.tls.secret_name)
        if data is None or "ca.crt" not in data:
            return None
        tls = TlsMaterial(data["ca.crt"], data.get("tls.crt"), data.get("tls.key"))
    return NatsTarget(url, credentials, tls)


async def reconcile_agent(
    operator: Operator,
    namespace: str,
    name: str,
    uid: str,
    spec_body: dict[str, Any],
    generation: int,
) -> str | None:
    """One full pass over an Agent: objects, JetStream, status.

    Returns what blocks the agent (a missing Secret, NATS), for the caller to retry with
    backoff, or None.
    """
    spec = AgentSpec.model_validate(spec_body)
    owner = Owner(namespace, name, uid)
    config = workload.build_runtime_config(owner, spec, operator.settings.nats_url)
    missing, secrets = await _missing_secrets(
        operator.kube, namespace, workload.referenced_secrets(spec)
    )

    manifests = [
        workload.build_config_map(owner, config),
        workload.build_service_account(owner, spec),
        workload.build_deployment(owner, spec, config),
    ]
    for manifest in manifests:
        if manifest is not None:
            await operator.kube.apply(manifest)

    messaging: status.MessagingObservation | None = None
    target = _nats_target(spec.nats, config.nats.url, secrets)
    if target is not None:
        resources = build_agent_resources(config, spec.runtime.replicas)
        try:
            await operator.nats.provision(target, resources)
            counts = await operator.nats.counts(target, resources)
        except MessagingUnavailable as error:
            messaging = status.MessagingObservation(target.url, error=str(error))
        else:
            messaging = status.MessagingObservation(
                target.url, counts=counts.consumers, dead_letters=counts.dead_letters
            )

    async def compute(body: dict[str, Any]) -> AgentStatus:
        deployment = await operator.kube.read_deployment(namespace, name)
        return status.agent_status(
            AgentStatus.model_validate(body.get("status") or {}),
            generation,
            datetime.now(UTC),
            status.observe_deployment(deployment),
            messaging=messaging,
            missing_secrets=missing,
            config_hash=workload.config_hash(config),
        )

    await _write_status(operator.kube, AGENTS, namespace, name, compute)
    if missing:
        return "; ".join(missing)
    if messaging is not None and messaging.error is not None:
        return f"NATS unavailable: {messaging.error}"
    return None


async def refresh_agent_workload(operator: Operator, namespace: str, name: str) -> None:
    """Update only what the Deployment reports (readiness), keeping the other observations.

    Until a full pass has written status, there is nothing to refresh: Ready must not
    turn True on replicas alone, before JetStream is in place.
    """

    async def compute(body: dict[str, Any]) -> AgentStatus | None:
        previous = AgentStatus.model_validate(body.get("status") or {})
        if previous.observed_generation == 0:
            return None
        deployment = await operator.kube.read_deployment(namespace, name)
        return status.agent_status(
            previous,
            previous.observed_generation,
            datetime.now(UTC),
            status.observe_deployment(deployment),
        )

    await _write_status(operator.kube, AGENTS, namespace, name, compute)


async def delete_agent_resources(
    operator: Operator, namespace: str, name: str, spec_body: dict[str, Any]
) -> list[str]:
    """Remove the agent's streams, and the shared ones no remaining Agent uses."""
    spec = AgentSpec.model_validate(spec_body)
    owner = Owner(namespace, name, uid="")
    config = workload.build_runtime_config(owner, spec, operator.settings.nats_url)
    target = await _required_target(operator, namespace, spec.nats, config.nats.url)
    staying = [
        AgentSpec.model_validate(agent["spec"])
        for agent in await operator.kube.list_custom(AGENTS, namespace)
        if agent["metadata"]["name"] != name
        and (
            "deletionTimestamp" not in agent["metadata"]
            or agent["spec"].get("deletionPolicy") == "Retain"
        )
    ]
    resources = build_agent_resources(config, spec.runtime.replicas)
    shared = orphaned_streams(namespace, spec, staying)
    return await operator.nats.delete(target, resources, shared)


async def _stop_engine(operator: Operator, namespace: str, name: str) -> None:
    for kind in ("Deployment", "ConfigMap"):
        await operator.kube.delete(kind, namespace, engine.engine_name(name))


async def reconcile_workflow(
    operator: Operator,
    namespace: str,
    name: str,
    uid: str,
    spec_body: dict[str, Any],
    generation: int,
) -> str | None:
    """One full pass over a Workflow: check it, run its engine if valid, JetStream, status.

    Returns what blocks the workflow (a missing Secret, NATS), for the caller to retry with
    backoff, or None.
    """
    spec = WorkflowSpec.model_validate(spec_body)
    owner = Owner(namespace, name, uid, kind="Workflow")
    priority_levels = {
        agent["metadata"]["name"]: int(
            agent.get("spec", {}).get("messaging", {}).get("priorityLevels", 1)
        )
        for agent in await operator.kube.list_custom(AGENTS, namespace)
    }
    agents = set(priority_levels)
    graph = status.DagObservation(
        len(spec.steps), dag.workflow_cycles(spec), dag.unknown_agents(spec, agents)
    )
    if not graph.valid:
        await _stop_engine(operator, namespace, name)

        async def invalid(body: dict[str, Any]) -> WorkflowStatus:
            return status.workflow_status(
                WorkflowStatus.model_validate(body.get("status") or {}),
                generation,
                datetime.now(UTC),
                dag=graph,
                workload=status.ENGINE_STOPPED,
            )

        await _write_status(operator.kube, WORKFLOWS, namespace, name, invalid)
        return None

    config = engine.build_engine_config(owner, spec, operator.settings.nats_url, priority_levels)
    missing, secrets = await _missing_secrets(
        operator.kube, namespace, pods.nats_secrets(spec.nats)
    )
    await operator.kube.apply(engine.build_engine_config_map(owner, config))
    await operator.kube.apply(
        engine.build_engine_deployment(owner, spec, config, operator.settings.runtime_image)
    )

    messaging: status.MessagingObservation | None = None
    runs: status.RunObservation | None = None
    target = _nats_target(spec.nats, config.nats.url, secrets)
    if target is not None:
        resources = build_workflow_resources(config)
        try:
            await operator.nats.provision_workflow(target, resources)
            runs = status.summarize_runs(await operator.nats.runs(target, resources))
        except MessagingUnavailable as error:
            messaging = status.MessagingObservation(target.url, error=str(error))
        else:
            messaging = status.MessagingObservation(target.url)

    async def compute(body: dict[str, Any]) -> WorkflowStatus:
        deployment = await operator.kube.read_deployment(namespace, engine.engine_name(name))
        return status.workflow_status(
            WorkflowStatus.model_validate(body.get("status") or {}),
            generation,
            datetime.now(UTC),
            dag=graph,
            workload=status.observe_deployment(deployment),
            messaging=messaging,
            missing_secrets=missing,
            runs=runs,
        )

    await _write_status(operator.kube, WORKFLOWS, namespace, name, compute)
    if missing:
        return "; ".join(missing)
    if messaging is not None and messaging.error is not None:
        return f"NATS unavailable: {messaging.error}"
    return None


async def refresh_workflow_engine(operator: Operator, namespace: str, name: str) -> None:
    """Update only what the engine's Deployment reports, once a full pass has written status
    and while the workflow is valid (an invalid one's engine is on its way out)."""

    async def compute(body: dict[str, Any]) -> WorkflowStatus | None:
        previous = WorkflowStatus.model_validate(body.get("status") or {})
        if previous.observed_generation == 0 or any(
            c.type in status.DAG_CONDITIONS and c.status != "True" for c in previous.conditions
        ):
            return None
        deployment = await operator.kube.read_deployment(namespace, engine.engine_name(name))
        return status.workflow_status(
            previous,
            previous.observed_generation,
            datetime.now(UTC),
            workload=status.observe_deployment(deployment),
        )

    await _write_status(operator.kube, WORKFLOWS, namespace, name, compute)


async def delete_workflow_resources(
    operator: Operator, namespace: str, name: str, spec_body: dict[str, Any]
) -> list[str] | None:
    """Stop the engine, then delete the workflow's stream, runs bucket and dead letters.

    Returns None while engine pods remain: a running engine would recreate the streams.
    """
    await _stop_engine(operator, namespace, name)
    if await operator.kube.pods_exist(namespace, f"{engine.WORKFLOW_LABEL}={name}"):
        return None
    spec = WorkflowSpec.model_validate(spec_body)
    config = engine.build_engine_config(
        Owner(namespace, name, uid="", kind="Workflow"), spec, operator.settings.nats_url
    )
    target = await _required_target(operator, namespace, spec.nats, config.nats.url)
    streams = [config.stream, f"KV_{config.runs_bucket}", config.dead_letter_stream]
    return await operator.nats.delete_streams(target, streams)


async def agent_pass(operator: Operator, body: dict[str, Any]) -> str | None:
    """``reconcile_agent`` for one Agent object, serialised per object, counted and timed."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    async with operator.lock("Agent", namespace, name):
        with metrics.reconcile_timer("Agent"):
            return await reconcile_agent(
                operator, namespace, name, meta["uid"], dict(body["spec"]), meta["generation"]
            )


async def workflow_pass(operator: Operator, body: dict[str, Any]) -> str | None:
    """``reconcile_workflow`` for one Workflow object, serialised per object, counted and timed."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    async with operator.lock("Workflow", namespace, name):
        with metrics.reconcile_timer("Workflow"):
            return await reconcile_workflow(
                operator, namespace, name, meta["uid"], dict(body["spec"]), meta["generation"]
            )


async def resync_once(operator: Operator) -> None:
    """One pass over every watched Agent and Workflow that is not being deleted."""
    semaphore = asyncio.Semaphore(RESYNC_CONCURRENCY)
    namespaces = operator.settings.namespaces

    async def guarded(run: Awaitable[object], what: str) -> None:
        async with semaphore:
            try:
                await run
            except Exception:
                logger.exception("resync of %s failed; the next resync retries", what)

    passes = []
    for plural, run_pass in ((AGENTS, agent_pass), (WORKFLOWS, workflow_pass)):
        for body in await operator.kube.list_watched(plural, namespaces):
            if "deletionTimestamp" in body["metadata"]:
                continue
            what = f"{plural}/{body['metadata']['namespace']}/{body['metadata']['name']}"
            passes.append(guarded(run_pass(operator, body), what))
    await asyncio.gather(*passes)


async def resync_forever(operator: Operator) -> None:
    """Every ``resync_seconds``: counts into status, drift in JetStream and objects corrected."""
    while True:
        await asyncio.sleep(operator.settings.resync_seconds)
        try:
            await resync_once(operator)
        except Exception:
            logger.exception("resync failed; retrying in %ss", operator.settings.resync_seconds)
