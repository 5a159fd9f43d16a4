"""The one pass skeleton both kinds share, and the I/O every pass needs.

A pass is level-based and idempotent: a kind (``agent``, ``workflow``) reads what it
must and plans purely, through ``builders``, what the object should lead to; the
skeleton here then converges the world the same way for every kind: it resolves the
Secrets, server-side applies (and deletes) objects, runs the kind's JetStream step
through ``troupe_runtime.nats.provision`` (which corrects drift), and writes status with
optimistic concurrency so concurrent writers never lose an observation. Kinds differ
only in what they plan and how they turn what was seen into status; writing the
skeleton once keeps Agents and Workflows from drifting apart.
``handlers`` calls these from kopf; they know nothing of kopf.
"""

from __future__ import annotations

import asyncio
import weakref
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Literal, Protocol, Self, TypeVar

from pydantic import BaseModel

from troupe_operator import metrics
from troupe_operator.api.agent import NatsConnection
from troupe_operator.builders import pods, status
from troupe_operator.builders.pods import ConfigMapReference, Owner, SecretReference
from troupe_operator.builders.problems import Problem
from troupe_operator.builders.status import MessagingObservation, WorkloadObservation
from troupe_operator.clients.kube import Conflict, Kube
from troupe_operator.clients.nats import (
    MessagingUnavailable,
    NatsPool,
    NatsTarget,
    TlsMaterial,
)
from troupe_operator.settings import OperatorSettings

STATUS_WRITE_ATTEMPTS = 5


class Spec(Protocol):
    """What the skeleton reads of any kind's spec."""

    @property
    def nats(self) -> NatsConnection: ...

    @property
    def deletion_policy(self) -> Literal["Delete", "Retain"]: ...

    @classmethod
    def model_validate(cls, obj: Any) -> Self: ...


SpecT = TypeVar("SpecT", bound=Spec)
StatusT = TypeVar("StatusT", bound=BaseModel)
ReadT = TypeVar("ReadT")


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


@dataclass(frozen=True)
class Seen(Generic[StatusT, ReadT]):
    """What a pass observed, for its kind to turn into the next status."""

    previous: StatusT
    now: datetime
    workload: WorkloadObservation
    """The plan's Deployment; a plan without one sees it missing."""
    missing_secrets: list[str]
    messaging: MessagingObservation | None
    """None when NATS was not tried: a Secret needed to reach it is missing."""
    jetstream: ReadT | None
    """What the kind's JetStream step read, when NATS answered."""


@dataclass(frozen=True)
class JetStreamStep(Generic[ReadT]):
    """Provision the object's JetStream resources on the NATS at ``url``, then read them."""

    connection: NatsConnection
    url: str
    run: Callable[[NatsPool, NatsTarget], Awaitable[ReadT]]


@dataclass(frozen=True)
class Plan(Generic[StatusT, ReadT]):
    """What one pass converges an object to, planned before anything is written."""

    status: Callable[[Seen[StatusT, ReadT]], StatusT]
    apply: list[dict[str, Any]] = field(default_factory=list)
    remove: list[tuple[str, str]] = field(default_factory=list)
    """(kind, name) of objects to delete, in order."""
    secrets: list[SecretReference] = field(default_factory=list)
    jetstream: JetStreamStep[ReadT] | None = None
    workload: str | None = None
    """The Deployment whose readiness status reports."""
    problems: list[Problem] = field(default_factory=list)
    """What is wrong with the spec: when any, the pass reports Stalled and converges nothing."""
    config_maps: list[ConfigMapReference] = field(default_factory=list)
    """ConfigMaps the spec names, checked to exist (with their keys) before pods wait on them."""


class Kind(ABC, Generic[SpecT, StatusT]):
    """What sets Agents and Workflows apart; the skeleton does the rest."""

    name: ClassVar[Literal["Agent", "Workflow"]]
    plural: ClassVar[str]
    label: ClassVar[str]
    """The label on the object's Deployment whose value is the object's name."""
    spec_model: type[SpecT]
    status_model: type[StatusT]

    def spec(self, body: Mapping[str, Any]) -> SpecT:
        return self.spec_model.model_validate(body)

    def status(self, body: Mapping[str, Any]) -> StatusT:
        return self.status_model.model_validate(body)

    @abstractmethod
    async def plan(
        self, operator: Operator, owner: Owner, spec: SpecT, generation: int
    ) -> Plan[StatusT, Any]:
        """Read what the plan depends on (never the object's own products), then build."""

    @abstractmethod
    def workload(self, name: str) -> str:
        """The Deployment of the object called ``name``."""

    @abstractmethod
    def refreshable(self, previous: StatusT) -> bool:
        """Whether the workload alone may update ``previous``.

        Not before a full pass has written status: Ready must not turn True on replicas
        alone, before JetStream is in place.
        """

    @abstractmethod
    def refreshed(self, previous: StatusT, workload: WorkloadObservation, now: datetime) -> StatusT:
        """``previous`` with only the workload observed anew."""

    @abstractmethod
    async def delete(self, operator: Operator, namespace: str, name: str, spec: SpecT) -> list[str]:
        """Delete what NATS holds for the object; return what was deleted."""


async def write_status(
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


async def missing_secrets(
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


def nats_target(
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


async def required_target(
    operator: Operator, namespace: str, connection: NatsConnection, url: str
) -> NatsTarget:
    """Where to reach NATS to delete resources; only the NATS Secrets matter for that."""
    _, secrets = await missing_secrets(operator.kube, namespace, pods.nats_secrets(connection))
    target = nats_target(connection, url, secrets)
    if target is None:
        raise MessagingUnavailable("a Secret needed to reach NATS is missing")
    return target


async def converge(
    operator: Operator,
    kind: Kind[Any, StatusT],
    owner: Owner,
    plan: Plan[StatusT, Any],
) -> str | None:
    """Carry ``plan`` out: Secrets, objects, JetStream, then status.

    Returns what blocks the object (a missing Secret, NATS), for the caller to retry with
    backoff, or None.
    """
    kube, namespace = operator.kube, owner.namespace
    missing, secrets = await missing_secrets(kube, namespace, plan.secrets)
    for manifest in plan.apply:
        await kube.apply(manifest)
    for object_kind, object_name in plan.remove:
        await kube.delete(object_kind, namespace, object_name)

    messaging: MessagingObservation | None = None
    read: Any = None
    step = plan.jetstream
    target = None if step is None else nats_target(step.connection, step.url, secrets)
    if step is not None and target is not None:
        try:
            read = await step.run(operator.nats, target)
        except MessagingUnavailable as error:
            messaging = MessagingObservation(target.url, error=str(error))
        else:
            messaging = MessagingObservation(target.url)

    async def compute(body: dict[str, Any]) -> StatusT:
        deployment = None
        if plan.workload is not None:
            deployment = await kube.read_deployment(namespace, plan.workload)
        seen = Seen(
            kind.status(body.get("status") or {}),
            datetime.now(UTC),
            status.observe_deployment(deployment),
            missing,
            messaging,
            read,
        )
        return plan.status(seen)

    await write_status(kube, kind.plural, namespace, owner.name, compute)
    if missing:
        return "; ".join(missing)
    if messaging is not None and messaging.error is not None:
        return f"NATS unavailable: {messaging.error}"
    return None


async def run_pass(operator: Operator, kind: Kind[Any, Any], body: Mapping[str, Any]) -> str | None:
    """One full pass over one object of ``kind``, serialised per object, counted and timed.

    Returns what blocks it, as ``converge`` does.
    """
    meta = body["metadata"]
    owner = Owner(meta["namespace"], meta["name"], meta["uid"], kind=kind.name)
    async with operator.lock(kind.name, owner.namespace, owner.name):
        with metrics.reconcile_timer(kind.name):
            spec = kind.spec(body["spec"])
            plan = await kind.plan(operator, owner, spec, meta["generation"])
            return await converge(operator, kind, owner, plan)


async def refresh(operator: Operator, kind: Kind[Any, StatusT], namespace: str, name: str) -> None:
    """Update only what the object's Deployment reports (readiness), keeping the rest."""

    async def compute(body: dict[str, Any]) -> StatusT | None:
        previous = kind.status(body.get("status") or {})
        if not kind.refreshable(previous):
            return None
        deployment = await operator.kube.read_deployment(namespace, kind.workload(name))
        return kind.refreshed(previous, status.observe_deployment(deployment), datetime.now(UTC))

    await write_status(operator.kube, kind.plural, namespace, name, compute)
