"""Autoscaling an Agent on its backlog: the pure decision, and the manifests it writes.

The decision (``plan_replicas``) reads only server-side facts: the consumers' counts and
last activity as the JetStream API answers them (from each consumer's leader) and the
time of the last change, kept on the Deployment itself (``SCALED_AT_ANNOTATION``). An
operator that restarts therefore decides exactly as the one before it; no timer lives in
memory.

Who owns ``spec.replicas`` is settled by server-side apply's field ownership, so the
operator never fights a HorizontalPodAutoscaler or a ScaledObject over it
(kagent-dev/kagent#1844): the operator's own manager (``FIELD_MANAGER``) owns replicas
only for a fixed ``runtime.replicas``; the native autoscaler writes them under a manager of
its own (``AUTOSCALER_MANAGER``), never anything else; with KEDA or a foreign HPA neither
writes them. ``replica_owners`` reads the managedFields that tell which is the case.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from troupe_operator.api.agent import AgentAutoscale
from troupe_operator.api.status import AutoscaleStatus
from troupe_operator.builders import pods
from troupe_operator.builders.pods import FIELD_MANAGER, Owner
from troupe_operator.builders.status import AUTOSCALED, Observation

AUTOSCALER_MANAGER = "troupe-autoscaler"
"""The field manager of the native autoscaler: it owns ``spec.replicas`` and the
annotation below, nothing else."""
SCALED_AT_ANNOTATION = "troupe.dev/scaled-at"
"""When the autoscaler last changed replicas (RFC 3339): the scale-down delay's start."""
OUR_MANAGERS = frozenset({FIELD_MANAGER, AUTOSCALER_MANAGER})

KEDA_GROUP = "keda.sh"
KEDA_VERSION = "v1alpha1"
SCALED_OBJECTS = "scaledobjects"
KEDA_CRD = f"{SCALED_OBJECTS}.{KEDA_GROUP}"
KEDA_MONITORING_PORT = 8222
"""nats-server's monitoring port, which KEDA's nats-jetstream scaler reads."""
KEDA_POLLING_SECONDS = 5
"""How often KEDA reads the lag while at zero replicas: the scale-from-zero delay's bound."""

HPA_WINDOW_MAX = 3600
"""The longest stabilization window an HPA takes, in seconds."""

SCALED_UP = "ScaledUp"
SCALED_DOWN = "ScaledDown"
SCALED_TO_ZERO = "ScaledToZero"
SCALED_FROM_ZERO = "ScaledFromZero"


@dataclass(frozen=True)
class Backlog:
    """An agent's consumers as the JetStream API reports them, summed over priorities."""

    pending: int
    ack_pending: int
    last_active: datetime | None
    """The latest of each consumer's creation, last delivery and last acknowledgement."""

    @property
    def lag(self) -> int:
        return self.pending + self.ack_pending


@dataclass(frozen=True)
class ScaleDecision:
    """How many replicas the agent should have, and why."""

    current: int
    desired: int
    lag: int
    reason: str
    """One of the ``SCALED_*`` reasons when ``desired`` differs from ``current``."""

    @property
    def changes(self) -> bool:
        return self.desired != self.current

    def message(self, policy: AgentAutoscale) -> str:
        return (
            f"{self.current} -> {self.desired} replicas: lag {self.lag}, "
            f"{policy.target_pending} per replica, between {policy.min_replicas} and "
            f"{policy.max_replicas}"
        )


def _reason(current: int, desired: int) -> str:
    if desired == 0:
        return SCALED_TO_ZERO
    if current == 0:
        return SCALED_FROM_ZERO
    return SCALED_UP if desired > current else SCALED_DOWN


def idle(
    policy: AgentAutoscale, backlog: Backlog, now: datetime, scaled_at: datetime | None
) -> bool:
    """No lag, and nothing delivered, acknowledged or scaled for ``scaleToZeroAfter``."""
    if backlog.lag > 0:
        return False
    moments = [moment for moment in (backlog.last_active, scaled_at) if moment is not None]
    return not moments or now - max(moments) >= policy.scale_to_zero_after


def plan_replicas(
    policy: AgentAutoscale,
    current: int,
    backlog: Backlog,
    now: datetime,
    scaled_at: datetime | None,
) -> ScaleDecision:
    """Desired replicas: clamp(ceil(lag / targetPending), minReplicas, maxReplicas), where:

    - a backlog always has a replica (lag > 0 never leaves zero pods);
    - with minReplicas 0, a running agent keeps one replica until it is ``idle``;
    - going down (but to zero) waits ``scaleDownDelay`` after the last change, unless the
      count is above maxReplicas; going up never waits.
    """
    lag = backlog.lag
    wanted = math.ceil(lag / policy.target_pending)
    floor = policy.min_replicas
    if floor == 0 and current > 0 and not idle(policy, backlog, now, scaled_at):
        floor = 1
    desired = min(max(wanted, floor), policy.max_replicas)
    recent = scaled_at is not None and now - scaled_at < policy.scale_down_delay
    if 0 < desired < current and recent:
        desired = min(current, policy.max_replicas)
    return ScaleDecision(current, desired, lag, _reason(current, desired))


def replicas_manifest(namespace: str, name: str, replicas: int, now: datetime) -> dict[str, Any]:
    """What the autoscaler applies under ``AUTOSCALER_MANAGER``: replicas and when they
    changed, nothing else (the rest of the Deployment is the operator's)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {SCALED_AT_ANNOTATION: _timestamp(now)},
        },
        "spec": {"replicas": replicas},
    }


def handover_manifest(namespace: str, name: str, replicas: int) -> dict[str, Any]:
    """The autoscaler taking ``spec.replicas`` over at its current value, before the
    operator's own manifest drops it: server-side apply removes a field its last owner
    stops applying (and the Deployment's default, 1, would replace it), so the field must
    have a second owner first."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": replicas},
    }


def _timestamp(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def scaled_at(deployment: Mapping[str, Any] | None) -> datetime | None:
    """The autoscaler's last change, from the Deployment's annotation; None if unreadable."""
    if deployment is None:
        return None
    annotations = (deployment.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(SCALED_AT_ANNOTATION)
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def current_replicas(deployment: Mapping[str, Any] | None) -> int:
    """``spec.replicas`` as stored (the API server defaults it to 1)."""
    if deployment is None:
        return 0
    value = (deployment.get("spec") or {}).get("replicas", 1)
    return value if isinstance(value, int) else 1


def replica_owners(deployment: Mapping[str, Any] | None) -> list[str]:
    """The field managers that own the Deployment's ``spec.replicas``, per managedFields."""
    if deployment is None:
        return []
    owners = []
    for entry in (deployment.get("metadata") or {}).get("managedFields") or []:
        if not isinstance(entry, Mapping):
            continue
        fields = entry.get("fieldsV1") or {}
        spec = fields.get("f:spec") if isinstance(fields, Mapping) else None
        if isinstance(spec, Mapping) and "f:replicas" in spec:
            owners.append(str(entry.get("manager") or ""))
    return owners


def foreign_owners(deployment: Mapping[str, Any] | None) -> list[str]:
    """Managers other than Troupe's that own replicas: an HPA (kube-controller-manager),
    KEDA, or a person's ``kubectl scale``."""
    return [owner for owner in replica_owners(deployment) if owner not in OUR_MANAGERS]


def targets(scaler: Mapping[str, Any], deployment: str) -> bool:
    """Whether an HPA (``spec.scaleTargetRef``) or a ScaledObject (the same field) scales
    the Deployment ``deployment``."""
    reference = (scaler.get("spec") or {}).get("scaleTargetRef") or {}
    if not isinstance(reference, Mapping):
        return False
    kind = reference.get("kind", "Deployment")
    return kind == "Deployment" and reference.get("name") == deployment


def monitoring_endpoint(nats_url: str) -> str:
    """host:8222 of the agent's NATS server, where KEDA's scaler reads the lag."""
    host = urlsplit(nats_url).hostname or "nats"
    return f"{host}:{KEDA_MONITORING_PORT}"


def build_scaled_object(
    owner: Owner,
    policy: AgentAutoscale,
    deployment: str,
    labels: dict[str, str],
    stream: str,
    consumers: Sequence[str],
    nats_url: str,
) -> dict[str, Any]:
    """A KEDA ScaledObject scaling ``deployment`` on the lag of each consumer.

    One nats-jetstream trigger per priority consumer (KEDA's HPA takes the largest per
    trigger, so a split backlog scales less than the native sum would). KEDA reads the
    monitoring endpoint and follows the consumer's leader there, but may read a follower
    first (kedacore/keda#7322, #6042): the native engine, which asks the JetStream API,
    does not have that failure. cooldownPeriod is scaleToZeroAfter; the HPA's scale-down
    stabilization is scaleDownDelay.
    """
    return {
        "apiVersion": f"{KEDA_GROUP}/{KEDA_VERSION}",
        "kind": "ScaledObject",
        "metadata": pods.metadata(owner, owner.name, labels),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment},
            "minReplicaCount": policy.min_replicas,
            "maxReplicaCount": policy.max_replicas,
            "pollingInterval": KEDA_POLLING_SECONDS,
            "cooldownPeriod": max(1, int(policy.scale_to_zero_after.total_seconds())),
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {
                        "scaleDown": {
                            "stabilizationWindowSeconds": min(
                                HPA_WINDOW_MAX, int(policy.scale_down_delay.total_seconds())
                            )
                        }
                    }
                }
            },
            "triggers": [
                {
                    "type": "nats-jetstream",
                    "metadata": {
                        "natsServerMonitoringEndpoint": monitoring_endpoint(nats_url),
                        "account": "$G",
                        "stream": stream,
                        "consumer": consumer,
                        "lagThreshold": str(policy.target_pending),
                        "activationLagThreshold": "0",
                    },
                }
                for consumer in consumers
            ],
        },
    }


KEDA_MISSING = "KedaMissing"
SCALED_EXTERNALLY = "ScaledExternally"


def observation(
    policy: AgentAutoscale | None,
    decision: ScaleDecision | None,
    scaled_by: str | None,
    keda_served: bool,
    scaled_object: str,
) -> Observation | None:
    """The ``Autoscaled`` advisory: who sets replicas and on what; None when nothing was
    observed (no autoscale and no HPA, or NATS did not answer)."""
    if scaled_by is not None:
        if policy is None:
            return Observation(
                AUTOSCALED,
                True,
                SCALED_EXTERNALLY,
                f"{scaled_by} sets the replicas: spec.runtime.replicas is not applied",
            )
        if policy.engine == "operator":
            return Observation(
                AUTOSCALED,
                False,
                SCALED_EXTERNALLY,
                f"{scaled_by} owns spec.replicas, so the operator's autoscaler stands down: "
                "delete it, or remove spec.runtime.autoscale",
            )
    if policy is None:
        return None
    if policy.engine == "keda":
        if not keda_served:
            return Observation(
                AUTOSCALED,
                False,
                KEDA_MISSING,
                f"engine keda, but the cluster serves no {KEDA_CRD}: install KEDA or use "
                "engine operator; replicas stay as they are",
            )
        return Observation(
            AUTOSCALED,
            True,
            "ScaledByKeda",
            f"ScaledObject {scaled_object} scales the Deployment on the consumers' lag",
        )
    if decision is None:
        return None
    return Observation(
        AUTOSCALED,
        True,
        SCALED_TO_ZERO if decision.desired == 0 else "Scaling",
        f"lag {decision.lag}: {decision.desired} replicas wanted ({policy.target_pending} per "
        f"replica, between {policy.min_replicas} and {policy.max_replicas})",
    )


def status(
    policy: AgentAutoscale | None,
    decision: ScaleDecision | None,
    scaled_by: str | None,
    scaled_at: datetime | None,
    previous: AutoscaleStatus | None,
) -> AutoscaleStatus | None:
    """``status.autoscale``: the last decision; the previous one when none was taken."""
    if policy is None:
        return None
    if decision is None and scaled_by is None and policy.engine == "operator":
        return previous
    return AutoscaleStatus(
        engine=policy.engine,
        desired_replicas=decision.desired if decision is not None else None,
        lag=decision.lag if decision is not None else 0,
        last_scale_time=_timestamp(scaled_at) if scaled_at is not None else None,
        scaled_by=scaled_by,
    )
