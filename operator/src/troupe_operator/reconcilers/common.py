"""The one pass skeleton both kinds share, and the I/O every pass needs.

A pass is level-based and idempotent: a kind (``agent``, ``workflow``) reads what it
must and plans purely, through ``builders``, what the object should lead to; the
skeleton here then converges the world the same way for every kind: it resolves the
Secrets and ConfigMaps, server-side applies (and deletes) the objects the object owns
and only those, runs the kind's JetStream step through ``troupe_runtime.nats.provision``
(which corrects drift), and writes status with optimistic concurrency so concurrent
writers never lose an observation, with an Event for each condition that changed. A spec
the models refuse, a plan's problems, an object refused or owned by someone else and an
unexpected exception all end in a status too: no object is left without one. Kinds differ
only in what they plan and how they turn what was seen into status; writing the
skeleton once keeps Agents and Workflows from drifting apart.
``handlers`` calls these from kopf; they know nothing of kopf.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Literal, Protocol, Self, TypeVar

from pydantic import BaseModel, ValidationError

from troupe_operator import metrics
from troupe_operator.api import API_VERSION
from troupe_operator.api.agent import AgentAutoscale, NatsConnection
from troupe_operator.api.status import Condition, ObjectStatus
from troupe_operator.builders import autoscale, pods, rejections, status
from troupe_operator.builders import directory as directory_builders
from troupe_operator.builders.directory import Listing
from troupe_operator.builders.pods import ConfigMapReference, Owner, SecretReference
from troupe_operator.builders.problems import Problem, SpecRejected
from troupe_operator.builders.status import (
    MessagingObservation,
    Observation,
    WorkloadObservation,
)
from troupe_operator.clients.kube import Conflict, Kube, Rejected
from troupe_operator.clients.nats import (
    MessagingUnavailable,
    NatsPool,
    NatsTarget,
    TlsMaterial,
)
from troupe_operator.reconcilers import directory
from troupe_operator.settings import OperatorSettings
from troupe_runtime.contract.agent_resources import AgentResources
from troupe_runtime.contract.redact import redact

STATUS_WRITE_ATTEMPTS = 5
SPEC_ERRORS_SHOWN = 5
DRIFT_CORRECTED = "DriftCorrected"
logger = logging.getLogger(__name__)


class Spec(Protocol):
    """What the skeleton reads of any kind's spec."""

    @property
    def nats(self) -> NatsConnection: ...

    @property
    def deletion_policy(self) -> Literal["Delete", "Retain"]: ...

    @classmethod
    def model_validate(cls, obj: Any) -> Self: ...


CLEANED_KEPT = 4096
"""How many cleaned-up UIDs are remembered: far more than a resync has in flight."""

SpecT = TypeVar("SpecT", bound=Spec)
StatusT = TypeVar("StatusT", bound=ObjectStatus)
ReadT = TypeVar("ReadT")


@dataclass
class Autoscaled:
    """An Agent the native autoscaler polls: where its consumers are, its policy, and the
    replicas and last change its last pass saw."""

    target: NatsTarget
    resources: AgentResources
    policy: AgentAutoscale
    current: int
    scaled_at: datetime | None


@dataclass
class Operator:
    """The clients and settings every pass shares."""

    kube: Kube
    nats: NatsPool
    settings: OperatorSettings
    locks: weakref.WeakValueDictionary[tuple[str, str, str], asyncio.Lock] = field(
        default_factory=weakref.WeakValueDictionary
    )
    autoscaled: dict[tuple[str, str], Autoscaled] = field(default_factory=dict)
    """The Agents the native autoscaler polls, by (namespace, name): registered by their
    passes, so a restarted operator finds them again on resume. Nothing here is a fact the
    decision rests on; those are read from NATS and the Deployment each time."""
    crds: dict[str, tuple[bool, float]] = field(default_factory=dict)
    """Whether the cluster serves a CRD (KEDA's), and when that was read (monotonic)."""
    without_scaled_object: set[tuple[str, str]] = field(default_factory=set)
    """Agents (namespace, name) not scaled by KEDA whose ScaledObject this process has seen
    gone: their passes skip looking for one. Only the operator makes an Agent's ScaledObject
    (owned by the Agent), so absence read once holds until the Agent asks for KEDA again; a
    restarted operator looks once more."""
    cleaned: OrderedDict[str, None] = field(default_factory=OrderedDict)
    """UIDs of the objects whose NATS resources were deleted, newest last: a resync pass
    planned from a listing taken before the deletion must not provision them again."""

    def lock(self, kind: str, namespace: str, name: str) -> asyncio.Lock:
        """Serialises passes over one object (a change handler and the resync).

        Weakly held: a lock lives while a pass holds or awaits it, so deleted objects
        leave nothing behind.
        """
        return self.locks.setdefault((kind, namespace, name), asyncio.Lock())

    async def has_crd(self, name: str) -> bool:
        """Whether the cluster serves the CRD ``name``, read at most every
        ``crd_recheck_seconds``: installing KEDA is seen within a minute, at one read."""
        now = time.monotonic()
        known = self.crds.get(name)
        if known is None or now - known[1] > self.settings.crd_recheck_seconds:
            known = (await self.kube.has_crd(name), now)
            self.crds[name] = known
        return known[0]

    def mark_cleaned(self, uid: str) -> None:
        """Remember that ``uid``'s resources are gone; the oldest of ``CLEANED_KEPT`` go."""
        self.cleaned[uid] = None
        while len(self.cleaned) > CLEANED_KEPT:
            self.cleaned.popitem(last=False)


@dataclass(frozen=True)
class Seen(Generic[StatusT, ReadT]):
    """What a pass observed, for its kind to turn into the next status."""

    previous: StatusT
    now: datetime
    workload: WorkloadObservation
    """The plan's Deployment; a plan without one sees it missing."""
    missing_secrets: list[Problem]
    """Absent Secrets, ConfigMaps and keys the spec names."""
    messaging: MessagingObservation | None
    """None when NATS was not tried: a Secret needed to reach it is missing."""
    jetstream: ReadT | None
    """What the kind's JetStream step read, when NATS answered."""
    scaled_by: str | None = None
    """The HorizontalPodAutoscaler that owns the Deployment's replicas, when not Troupe."""


@dataclass(frozen=True)
class JetStreamStep(Generic[ReadT]):
    """Provision the object's JetStream resources on the NATS at ``url``, then read them."""

    connection: NatsConnection
    url: str
    run: Callable[[NatsPool, NatsTarget], Awaitable[ReadT]]
    replicas: int = 1
    """The replicas of every stream and bucket the step creates (``spec.nats.replicas``)."""


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
    directory: Listing | None = None
    """The object's gateway directory key, converged with the status written."""


class Kind(ABC, Generic[SpecT, StatusT]):
    """What sets Agents and Workflows apart; the skeleton does the rest."""

    name: ClassVar[Literal["Agent", "Workflow"]]
    plural: ClassVar[str]
    label: ClassVar[str]
    """The label on the object's Deployment whose value is the object's name."""
    spec_model: type[SpecT]
    status_model: type[StatusT]
    subconditions: ClassVar[tuple[str, ...]]
    advisories: ClassVar[tuple[str, ...]] = ()

    def spec(self, body: Mapping[str, Any]) -> SpecT:
        return self.spec_model.model_validate(body)

    def status(self, body: Mapping[str, Any]) -> StatusT:
        return self.status_model.model_validate(body)

    def reported(
        self, previous: StatusT, observed: list[Observation], generation: int, now: datetime
    ) -> StatusT:
        """``previous`` with only ``observed`` merged in: the status of a pass that got no
        further than a spec the models refuse, a problem, or a failure."""
        return status.with_observations(
            previous, observed, self.subconditions, generation, now, self.advisories
        )

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
    async def delete(
        self,
        operator: Operator,
        namespace: str,
        name: str,
        spec: SpecT | None,
        raw_spec: Mapping[str, Any],
    ) -> list[str]:
        """Delete what NATS holds for the object; return what was deleted.

        ``spec`` is None when the models refuse the stored one (``raw_spec``): then only
        what its name alone derives goes. ``CleanupBlocked`` or ``MessagingUnavailable``
        while NATS cannot be reached.
        """

    @abstractmethod
    def leftovers(self, namespace: str, name: str) -> list[str]:
        """What deleting the object leaves in NATS when the cleanup is given up."""


@dataclass(frozen=True)
class Written:
    """A status patch that went through: the object as read, its old and current status."""

    body: dict[str, Any]
    previous: dict[str, Any]
    current: dict[str, Any]

    def transitions(self) -> list[status.Transition]:
        def conditions(found: dict[str, Any]) -> list[Condition]:
            return [Condition.model_validate(c) for c in found.get("conditions") or []]

        return status.transitions(conditions(self.previous), conditions(self.current))


async def write_status(
    kube: Kube,
    plural: str,
    namespace: str,
    name: str,
    compute: Callable[[dict[str, Any]], Awaitable[BaseModel | None]],
) -> Written | None:
    """Read, compute, compare and patch; recompute from a fresh read on a conflict.

    ``compute`` returns None when there is nothing to write. Returns what was written, or
    None when nothing was.
    """
    for _ in range(STATUS_WRITE_ATTEMPTS):
        body = await kube.read_custom(plural, namespace, name)
        if body is None:
            return None
        new = await compute(body)
        if new is None:
            return None
        # Unset fields are left out, as the API server stores them.
        desired = new.model_dump(by_alias=True, exclude_none=True)
        previous = body.get("status") or {}
        if desired == previous:
            return None
        patch = status.merge_patch(previous, desired)
        try:
            await kube.patch_status(
                plural, namespace, name, patch, body["metadata"]["resourceVersion"]
            )
        except Conflict:
            continue
        return Written(body, previous, desired)
    raise Conflict(f"{plural}/{namespace}/{name}: status kept changing under the operator")


def regarding(kind: str, body: Mapping[str, Any]) -> dict[str, str]:
    """The Event's ``involvedObject`` for an Agent or Workflow."""
    meta = body["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": meta["name"],
        "namespace": meta["namespace"],
        "uid": meta["uid"],
    }


async def announce(kube: Kube, kind: str, written: Written | None) -> None:
    """An Event for each condition the status write changed."""
    if written is None:
        return
    for change in written.transitions():
        await kube.create_event(
            regarding(kind, written.body),
            "Warning" if change.warning else "Normal",
            change.reason,
            f"{change.type}={change.status}: {change.message}",
        )


async def report(
    operator: Operator,
    kind: Kind[Any, StatusT],
    owner: Owner,
    generation: int,
    observed: list[Observation],
) -> None:
    """Write a status with only ``observed`` merged in, and announce what changed."""

    async def compute(body: dict[str, Any]) -> StatusT:
        previous = kind.status(body.get("status") or {})
        return kind.reported(previous, observed, generation, datetime.now(UTC))

    written = await write_status(operator.kube, kind.plural, owner.namespace, owner.name, compute)
    await announce(operator.kube, kind.name, written)


def spec_problems(error: ValidationError, spec: Any) -> list[Problem]:
    """What the models refuse in a stored spec, one problem per field (camelCase paths,
    as the API stores them), never echoing a value: it may be a secret."""
    messages: dict[str, list[str]] = {}
    for found in error.errors():
        path: list[str | int] = ["spec"]
        node = spec
        for segment in found["loc"]:
            # Union members add their type (``int``, ``str``) to the path: not a field.
            if isinstance(segment, str) and not isinstance(node, Mapping):
                continue
            if isinstance(segment, int) and not isinstance(node, list):
                continue
            path.append(segment)
            if isinstance(node, Mapping):
                node = node.get(segment)
            elif isinstance(node, list) and isinstance(segment, int) and segment < len(node):
                node = node[segment]
            else:
                node = None
        said = messages.setdefault(rejections.render_path(tuple(path)), [])
        if found["msg"] not in said:
            said.append(found["msg"])
    return [
        Problem(field, status.SPEC_INVALID, " or ".join(said))
        for field, said in list(messages.items())[:SPEC_ERRORS_SHOWN]
    ]


async def missing_secrets(
    kube: Kube, namespace: str, references: list[SecretReference]
) -> tuple[list[Problem], dict[str, dict[str, bytes]]]:
    """A problem for each absent Secret or key, and the data of the Secrets found."""
    missing: list[Problem] = []
    found: dict[str, dict[str, bytes]] = {}
    for reference in references:
        data = await kube.read_secret(namespace, reference.name)
        if data is None:
            missing.append(
                Problem(
                    reference.field,
                    status.SECRET_NOT_FOUND,
                    f"Secret {reference.name} does not exist in namespace {namespace}:"
                    " create it or fix the reference",
                )
            )
        elif reference.key is not None and reference.key not in data:
            missing.append(
                Problem(
                    reference.field,
                    status.SECRET_KEY_MISSING,
                    f"Secret {reference.name} has no key {reference.key}",
                )
            )
        else:
            found[reference.name] = data
    return missing, found


async def missing_config_maps(
    kube: Kube, namespace: str, references: list[ConfigMapReference]
) -> list[Problem]:
    """A problem for each absent ConfigMap or key: pods would wait on it forever."""
    missing: list[Problem] = []
    for reference in references:
        keys = await kube.config_map_keys(namespace, reference.name)
        if keys is None:
            missing.append(
                Problem(
                    reference.field,
                    status.CONFIG_MAP_NOT_FOUND,
                    f"ConfigMap {reference.name} does not exist in namespace {namespace}:"
                    " create it or fix the reference",
                )
            )
        elif reference.key is not None and reference.key not in keys:
            missing.append(
                Problem(
                    reference.field,
                    status.CONFIG_MAP_KEY_MISSING,
                    f"ConfigMap {reference.name} has no key {reference.key}",
                )
            )
    return missing


def nats_target(
    connection: NatsConnection,
    url: str,
    secrets: dict[str, dict[str, bytes]],
    replicas: int = 1,
) -> NatsTarget | None:
    """How the operator reaches a spec's NATS, or None while a Secret (or key) it needs is
    missing."""
    credentials = None
    if connection.credentials_secret:
        data = secrets.get(connection.credentials_secret.name)
        if data is None or connection.credentials_secret.key not in data:
            return None
        credentials = data[connection.credentials_secret.key].decode()
    tls = None
    if connection.tls:
        data = secrets.get(connection.tls.secret_name)
        if data is None or "ca.crt" not in data:
            return None
        tls = TlsMaterial(data["ca.crt"], data.get("tls.crt"), data.get("tls.key"))
    return NatsTarget(url, credentials, tls, replicas)


class CleanupBlocked(Exception):
    """NATS cannot be reached to delete what an object leaves there (a Secret missing,
    the server not answering): deletion retries, then lets go."""


async def required_target(
    operator: Operator, namespace: str, connection: NatsConnection, url: str
) -> NatsTarget:
    """Where to reach NATS to delete resources; only the NATS Secrets matter for that."""
    missing, secrets = await missing_secrets(
        operator.kube, namespace, pods.nats_secrets(connection)
    )
    target = nats_target(connection, url, secrets)
    if target is None:
        described = "; ".join(p.sentence() for p in missing) or "a Secret it names lacks ca.crt"
        raise CleanupBlocked(f"cannot reach NATS at {redact(url)}: {described}")
    return target


def raw_connection(raw_spec: Mapping[str, Any]) -> NatsConnection:
    """The NATS connection of a spec the models refuse: its own, if that part is valid,
    else the operator's default."""
    try:
        return NatsConnection.model_validate(raw_spec.get("nats") or {})
    except ValidationError:
        return NatsConnection()


def owned_by(found: Mapping[str, Any], uid: str) -> bool:
    return any(
        reference.get("uid") == uid
        for reference in (found.get("metadata") or {}).get("ownerReferences") or []
    )


def controlled_by(found: Mapping[str, Any], kind: str, name: str) -> bool:
    """Whether ``found``'s controller is the ``kind`` called ``name`` (any incarnation: for
    deletion, which no longer knows the uid it wrote)."""
    return any(
        reference.get("controller")
        and (reference.get("kind"), reference.get("name")) == (kind, name)
        for reference in (found.get("metadata") or {}).get("ownerReferences") or []
    )


def _version(found: Mapping[str, Any]) -> Any:
    """What changes when an object's content does: a Deployment's generation (its status
    changes the resourceVersion all the time), else the resourceVersion."""
    meta = found.get("metadata") or {}
    return meta.get("generation", meta.get("resourceVersion"))


OWNED_FIELDS = {"ServiceAccount": "spec.runtime.createServiceAccount"}
"""The spec field that asks for an object, when not its name (``metadata.name``)."""


@dataclass
class Applied:
    """What applying a plan's objects came to."""

    problems: list[Problem] = field(default_factory=list)
    drifted: list[str] = field(default_factory=list)
    """Objects the apply changed back to the spec (drift corrections)."""
    waiting: str | None = None
    """An object of a previous owner the garbage collector has yet to remove."""
    scaled_by: str | None = None
    """The HorizontalPodAutoscaler that owns the Deployment's replicas, when not Troupe."""


def _foreign(owner: Owner, kind: str, found: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether ``found`` belongs to a previous object of the owner's kind and name (going
    away with it), and a description of its owner."""
    references = (found.get("metadata") or {}).get("ownerReferences") or []
    for reference in references:
        if reference.get("controller"):
            previous = reference.get("kind") == owner.kind and reference.get("name") == owner.name
            return previous, f"{reference.get('kind')} {reference.get('name')}"
    return False, "no owner Troupe knows of"


async def apply_objects(
    kube: Kube, owner: Owner, manifests: list[dict[str, Any]], specs: Sequence[Any]
) -> Applied:
    """Apply each manifest the owner owns or that does not exist yet, in order; stop at the
    first that belongs to someone else (``ObjectConflict``) or that the API server refuses
    (``ObjectRejected``): what follows may depend on it."""
    applied = Applied()
    for manifest in manifests:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        existing = await kube.read(kind, owner.namespace, name)
        if existing is not None and not owned_by(existing, owner.uid):
            previous, described = _foreign(owner, kind, existing)
            if previous:
                applied.waiting = (
                    f"{kind} {name} belongs to a previous {owner.kind} {owner.name} and is"
                    " being garbage-collected"
                )
            else:
                applied.problems.append(
                    Problem(
                        OWNED_FIELDS.get(kind, "metadata.name"),
                        status.OBJECT_CONFLICT,
                        f"{kind} {name} already exists and is not this {owner.kind}'s"
                        f" (owner: {described}): Troupe leaves it alone; delete it or rename"
                        f" the {owner.kind}",
                    )
                )
            return applied
        if kind == "Deployment" and existing is not None:
            manifest, applied.scaled_by = await settle_replicas(kube, manifest, existing)
        try:
            result = await kube.apply(manifest)
        except Rejected as error:
            refused = [rejections.RefusedField(c.field, c.message) for c in error.causes]
            applied.problems.extend(
                rejections.rejection_problems(manifest, specs, error.message, refused)
            )
            return applied
        if existing is not None and _version(existing) != _version(result):
            applied.drifted.append(f"{kind} {name}")
    return applied


async def external_scaler(kube: Kube, deployment: Mapping[str, Any]) -> str | None:
    """The HorizontalPodAutoscaler (KEDA's included) that scales ``deployment``, if one does.

    Listed only when a manager other than Troupe's owns ``spec.replicas`` (managedFields,
    already read): an HPA that never wrote replicas is not fighting anyone, and agents no
    one else scales cost no request. Someone's ``kubectl scale`` with no HPA behind it is
    drift, and corrected."""
    if not autoscale.foreign_owners(deployment):
        return None
    meta = deployment.get("metadata") or {}
    for scaler in await kube.list_autoscalers(str(meta.get("namespace"))):
        if autoscale.targets(scaler, str(meta.get("name"))):
            return f"HorizontalPodAutoscaler {scaler['metadata']['name']}"
    return None


async def settle_replicas(
    kube: Kube, manifest: dict[str, Any], existing: Mapping[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """The Deployment manifest to apply, and the HPA that scales it if one does.

    With an HPA scaling it, the manifest loses ``spec.replicas``: the operator owns nothing
    there to fight over. When the manifest leaves replicas out and the operator owned them
    till now, the autoscaler's manager first takes them over at their current value (a
    field its last owner drops is removed, and the Deployment would fall back to 1 pod)."""
    scaler = await external_scaler(kube, existing)
    spec = manifest["spec"]
    if scaler is not None and "replicas" in spec:
        manifest = {**manifest, "spec": {k: v for k, v in spec.items() if k != "replicas"}}
    if "replicas" not in manifest["spec"] and pods.FIELD_MANAGER in autoscale.replica_owners(
        existing
    ):
        meta = manifest["metadata"]
        current = autoscale.current_replicas(existing)
        handover = autoscale.handover_manifest(meta["namespace"], meta["name"], current)
        await kube.apply(handover, autoscale.AUTOSCALER_MANAGER)
    return manifest, scaler


async def remove_objects(kube: Kube, owner: Owner, objects: list[tuple[str, str]]) -> None:
    """Delete each object the owner owns; one that is not its own is left alone."""
    for object_kind, object_name in objects:
        existing = await kube.read(object_kind, owner.namespace, object_name)
        if existing is not None and owned_by(existing, owner.uid):
            await kube.delete(object_kind, owner.namespace, object_name)


async def observe_workload(kube: Kube, namespace: str, name: str | None) -> WorkloadObservation:
    """The Deployment ``name`` and, while it is not ready, its pods (for crashes)."""
    deployment = None if name is None else await kube.read_deployment(namespace, name)
    observed = status.observe_deployment(deployment)
    if deployment is None or observed.ready >= observed.desired:
        return observed
    selector = ((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    if not selector:
        return observed
    return status.observe_deployment(deployment, await kube.list_pods(namespace, selector))


@dataclass
class Phase:
    """The sub-condition an unexpected failure falls on: that of the step under way."""

    condition: str = status.SPEC_VALID


async def converge(
    operator: Operator,
    kind: Kind[Any, StatusT],
    owner: Owner,
    plan: Plan[StatusT, Any],
    generation: int,
    raw_spec: Mapping[str, Any],
    settled: bool,
    phase: Phase,
) -> str | None:
    """Carry ``plan`` out: Secrets and ConfigMaps, objects, JetStream, then status.

    A plan with problems writes nothing (no object, no NATS) and reports them, stalled,
    with what it reads (Secrets, the Deployment). Returns what blocks the object
    for the caller to retry with backoff (NATS unreachable), or None: stalled objects wait
    for their spec or the objects it names to change (the resync rechecks). ``settled``:
    the last pass saw this generation, so an apply that changes an object corrects drift.
    """
    kube, namespace = operator.kube, owner.namespace
    # A spec with problems changes nothing: it is only read about and reported.
    writes = not plan.problems

    phase.condition = status.SECRETS_RESOLVED
    missing, secrets = await missing_secrets(kube, namespace, plan.secrets)
    missing += await missing_config_maps(kube, namespace, plan.config_maps)

    phase.condition = status.WORKLOAD_AVAILABLE
    applied = Applied()
    if writes:
        specs = [raw_spec, _dumped(raw_spec, kind)]
        applied = await apply_objects(kube, owner, plan.apply, specs)
        await remove_objects(kube, owner, plan.remove)

    phase.condition = status.MESSAGING_READY
    messaging: MessagingObservation | None = None
    read: Any = None
    rejected: list[Problem] = []
    step = plan.jetstream if writes else None
    target = (
        None if step is None else nats_target(step.connection, step.url, secrets, step.replicas)
    )
    if step is not None and target is not None:
        try:
            read = await step.run(operator.nats, target)
        except MessagingUnavailable as error:
            messaging = MessagingObservation(redact(target.url), error=redact(str(error)))
        except SpecRejected as error:
            rejected = error.problems
        else:
            messaging = MessagingObservation(redact(target.url))

    phase.condition = status.WORKLOAD_AVAILABLE
    problems = [*plan.problems, *applied.problems, *rejected]
    # The status as stored once written: the last one computed, unless the object is being
    # deleted (its finalizer withdraws its directory entry: no pass may list it again).
    final: list[StatusT] = []

    async def compute(body: dict[str, Any]) -> StatusT:
        now = datetime.now(UTC)
        previous = kind.status(body.get("status") or {})
        seen = Seen(
            previous,
            now,
            await observe_workload(kube, namespace, plan.workload),
            missing,
            messaging,
            read,
            applied.scaled_by,
        )
        observed = [
            *status.problem_observations(problems, clear=(status.SPEC_VALID,)),
            *([_leaving(applied.waiting)] if applied.waiting else []),
        ]
        new = kind.reported(plan.status(seen), observed, generation, now)
        conditions = status.keep_transition_times(previous.conditions, new.conditions)
        new = new.model_copy(update={"conditions": conditions})
        final[:] = [] if "deletionTimestamp" in body["metadata"] else [new]
        return new

    written = await write_status(kube, kind.plural, namespace, owner.name, compute)
    await announce(kube, kind.name, written)
    listed = None
    if plan.directory is not None and final:
        ready = directory_builders.is_ready(final[0].conditions)
        listed = await directory.publish(operator, plan.directory, ready)
    if settled and applied.drifted:
        meta = {"metadata": {"name": owner.name, "namespace": namespace, "uid": owner.uid}}
        await kube.create_event(
            regarding(kind.name, meta),
            "Normal",
            DRIFT_CORRECTED,
            f"changed outside Troupe, restored to the spec: {', '.join(applied.drifted)}",
        )
    if applied.waiting:
        return applied.waiting
    if messaging is not None and messaging.error is not None:
        return f"NATS unavailable: {messaging.error}"
    return listed


def _leaving(message: str) -> Observation:
    return Observation(status.WORKLOAD_AVAILABLE, False, "ObjectLeaving", message)


def _dumped(raw_spec: Mapping[str, Any], kind: Kind[Any, Any]) -> Any:
    """The spec as the models dump it (defaults filled in), as builders copy it."""
    try:
        model: BaseModel = kind.spec(raw_spec)
    except ValidationError:
        return None
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


async def run_pass(operator: Operator, kind: Kind[Any, Any], body: Mapping[str, Any]) -> str | None:
    """One full pass over one object of ``kind``, serialised per object, counted and timed.

    Never leaves the object without a status: a spec the models refuse is reported as
    SpecInvalid (stalled), an unexpected failure as ReconcileFailed on the step's
    sub-condition (retried). Returns what blocks it, as ``converge`` does.
    """
    meta = body["metadata"]
    owner = Owner(meta["namespace"], meta["name"], meta["uid"], kind=kind.name)
    generation = int(meta.get("generation") or 1)
    raw_spec = body.get("spec") or {}
    settled = (body.get("status") or {}).get("observedGeneration") == generation
    async with operator.lock(kind.name, owner.namespace, owner.name):
        if owner.uid in operator.cleaned:
            # Deleted while this pass waited for the lock: it would provision it again.
            return None
        with metrics.reconcile_timer(kind.name):
            try:
                spec = kind.spec(raw_spec)
            except ValidationError as error:
                problems = spec_problems(error, raw_spec)
                await report(operator, kind, owner, generation, [_spec_invalid(problems)])
                return None
            phase = Phase()
            try:
                plan = await kind.plan(operator, owner, spec, generation)
                return await converge(
                    operator, kind, owner, plan, generation, raw_spec, settled, phase
                )
            except Exception as error:
                message = redact(f"{type(error).__name__}: {error}")
                logger.exception(
                    "%s %s/%s: the pass failed", kind.name, owner.namespace, owner.name
                )
                observed = [status.reconcile_failed(phase.condition, message)]
                await report(operator, kind, owner, generation, observed)
                return f"the pass failed: {message}"


def _spec_invalid(problems: list[Problem]) -> Observation:
    return status.spec_invalid("; ".join(problem.sentence() for problem in problems))


NOT_FROM_THE_WORKLOAD = frozenset(
    {status.OBJECT_CONFLICT, status.OBJECT_REJECTED, "ObjectLeaving", status.RECONCILE_FAILED}
)


def _workload_reports(previous: ObjectStatus) -> bool:
    """Whether the Deployment may speak for WorkloadAvailable: not while the spec is invalid
    or the last pass could not write the Deployment (it may not be Troupe's)."""
    for condition in previous.conditions:
        if condition.type == status.SPEC_VALID and condition.status != "True":
            return False
        if (
            condition.type == status.WORKLOAD_AVAILABLE
            and condition.reason in NOT_FROM_THE_WORKLOAD
        ):
            return False
    return True


async def refresh(operator: Operator, kind: Kind[Any, StatusT], namespace: str, name: str) -> None:
    """Update only what the object's Deployment reports (readiness), keeping the rest.

    Serialised with the object's passes: a Deployment event that arrives while a first pass
    runs would otherwise find no status to refresh and be lost until the next resync.
    """

    async def compute(body: dict[str, Any]) -> StatusT | None:
        previous = kind.status(body.get("status") or {})
        if not kind.refreshable(previous) or not _workload_reports(previous):
            return None
        workload = await observe_workload(operator.kube, namespace, kind.workload(name))
        return kind.refreshed(previous, workload, datetime.now(UTC))

    async with operator.lock(kind.name, namespace, name):
        written = await write_status(operator.kube, kind.plural, namespace, name, compute)
        if written is not None and "deletionTimestamp" not in written.body["metadata"]:
            await directory.follow_readiness(operator, kind.name, namespace, name, written.current)
    await announce(operator.kube, kind.name, written)
