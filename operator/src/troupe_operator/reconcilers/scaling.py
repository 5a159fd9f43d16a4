"""The native autoscaler's one step for one Agent: read, decide (``builders.autoscale``),
write ``spec.replicas`` under the autoscaler's own field manager, and say so in an Event.

A pass over an autoscaled Agent runs it after counting the consumers; the polling loop
(``reconcilers.autoscaler``) runs that pass as soon as its cheaper reading says replicas
should change, so every decision is taken from fresh facts, under the Agent's lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from troupe_operator.api.agent import AgentAutoscale
from troupe_operator.builders import autoscale
from troupe_operator.builders.autoscale import Backlog, ScaleDecision
from troupe_operator.builders.pods import Owner
from troupe_operator.clients.nats import NatsTarget
from troupe_operator.reconcilers.common import Autoscaled, Operator, external_scaler, regarding
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_resources import AgentResources


@dataclass(frozen=True)
class Scaling:
    """What the step did: its decision, or the HPA it stood down for."""

    decision: ScaleDecision | None
    scaled_by: str | None = None
    scaled_at: datetime | None = None


async def scale_agent(
    operator: Operator,
    owner: Owner,
    policy: AgentAutoscale,
    backlog: Backlog,
    target: NatsTarget,
    resources: AgentResources,
) -> Scaling:
    """Converge the Deployment's replicas to the decision for ``backlog``.

    Stands down (writes nothing) when an HPA owns replicas: two controllers on one field
    would undo each other's work."""
    kube, namespace = operator.kube, owner.namespace
    name = naming.agent_deployment(owner.name)
    deployment = await kube.read_deployment(namespace, name)
    if deployment is None:
        return Scaling(None)
    scaler = await external_scaler(kube, deployment)
    if scaler is not None:
        operator.autoscaled.pop((namespace, owner.name), None)
        return Scaling(None, scaled_by=scaler)
    now = datetime.now(UTC)
    scaled_at = autoscale.scaled_at(deployment)
    decision = autoscale.plan_replicas(
        policy, autoscale.current_replicas(deployment), backlog, now, scaled_at
    )
    if decision.changes:
        manifest = autoscale.replicas_manifest(namespace, name, decision.desired, now)
        await kube.apply(manifest, autoscale.AUTOSCALER_MANAGER)
        scaled_at = now
        meta = {"metadata": {"name": owner.name, "namespace": namespace, "uid": owner.uid}}
        await kube.create_event(
            regarding("Agent", meta), "Normal", decision.reason, decision.message(policy)
        )
    operator.autoscaled[(namespace, owner.name)] = Autoscaled(
        target, resources, policy, decision.desired, scaled_at
    )
    return Scaling(decision, scaled_at=scaled_at)
