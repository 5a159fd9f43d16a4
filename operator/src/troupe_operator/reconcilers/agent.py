"""Agents: what a pass over one plans, and what deleting one removes from NATS.

An Agent leads to its runtime ConfigMap, ServiceAccount (when asked for) and
Deployment, and to its JetStream streams, consumers and buckets; its status
carries the consumers' counts. Deleting it deletes its own streams and the shared
ones (KV buckets, the namespace's event log) that no remaining Agent uses.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from troupe_operator.api import AgentSpec, AgentStatus, ModelProviderSpec
from troupe_operator.api.status import AgentSubjects
from troupe_operator.builders import autoscale, status, validation, workload
from troupe_operator.builders import directory as directory_builders
from troupe_operator.builders import jetstream as jetstream_builders
from troupe_operator.builders import llm as llm_builders
from troupe_operator.builders.jetstream import orphaned_streams
from troupe_operator.builders.pods import Owner
from troupe_operator.builders.problems import Problem
from troupe_operator.builders.status import WorkloadObservation
from troupe_operator.clients.nats import Counts, NatsPool, NatsTarget
from troupe_operator.reconcilers import directory
from troupe_operator.reconcilers import scaling as scaling_step
from troupe_operator.reconcilers.budget import budgets_staying
from troupe_operator.reconcilers.common import (
    JetStreamStep,
    Kind,
    Operator,
    Plan,
    Seen,
    raw_connection,
    required_target,
    run_pass,
)
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_resources import build_agent_resources, inbox_subjects
from troupe_runtime.contract.gateway import DirectoryEntry
from troupe_runtime.contract.llm_policy import LlmPolicy

logger = logging.getLogger(__name__)


class AgentKind(Kind[AgentSpec, AgentStatus]):
    name = "Agent"
    plural = "agents"
    label = workload.AGENT_LABEL
    spec_model = AgentSpec
    status_model = AgentStatus
    subconditions = status.AGENT_SUBCONDITIONS
    advisories = status.AGENT_ADVISORIES

    async def plan(
        self, operator: Operator, owner: Owner, spec: AgentSpec, generation: int
    ) -> Plan[AgentStatus, AgentRead]:
        problems = validation.agent_problems(spec)
        if problems:
            # Nothing is built from a spec with problems: it is only reported (and building
            # may itself fail, e.g. on a schema nested too deep to serialise).
            return self._refused(operator, owner, spec, generation, problems)
        resolution = (
            await self._resolve_llm(operator, owner, spec.llm)
            if spec.llm is not None
            else llm_builders.Resolution(None, [])
        )
        if resolution.problems:
            return self._refused(operator, owner, spec, generation, resolution.problems)
        config = workload.build_runtime_config(
            owner,
            spec,
            operator.settings.nats_url,
            resolution.runtime,
            operator.settings.nats_replicas,
        )
        if spec.llm is not None and (too_large := validation.config_problems(config)):
            return self._refused(operator, owner, spec, generation, too_large)
        resources = jetstream_builders.with_shared_buckets(
            build_agent_resources(config, workload.most_replicas(spec)),
            owner.namespace,
            spec,
            await self._declarers(operator, owner, spec) if spec.state else [],
        )
        resources = jetstream_builders.with_llm(resources, owner.namespace, spec)
        object_stores = jetstream_builders.llm_object_stores(owner.namespace, spec)
        fields = jetstream_builders.agent_spec_fields(owner.namespace, resources, spec)
        config_hash = workload.config_hash(config)
        subjects = AgentSubjects(
            inbox=inbox_subjects(config), dead_letters=config.dead_letter_subject
        )

        policy = spec.runtime.autoscale
        native = policy is not None and policy.engine == "operator"
        if not native:
            operator.autoscaled.pop((owner.namespace, owner.name), None)
        keda_served = await operator.has_crd(autoscale.KEDA_CRD)
        keda = policy is not None and policy.engine == "keda" and keda_served
        # An Agent KEDA does not scale may have a ScaledObject left from when it did: looked
        # for (one GET) until a pass has seen it gone, not on every pass of every Agent.
        key = (owner.namespace, owner.name)
        if keda:
            operator.without_scaled_object.discard(key)
        unscaled = keda_served and not keda and key not in operator.without_scaled_object

        async def jetstream(nats: NatsPool, target: NatsTarget) -> AgentRead:
            await nats.provision(target, resources, fields, object_stores)
            counts = await nats.counts(target, resources)
            scaling = None
            if native:
                assert policy is not None
                scaling = await scaling_step.scale_agent(
                    operator, owner, policy, counts.backlog, target, resources
                )
            if spec.llm is not None:
                bucket = naming.usage_bucket(owner.namespace)
                used = await nats.usage(target, bucket, owner.name, datetime.now(UTC))
                counts = dataclasses.replace(counts, usage=used)
            return AgentRead(counts, scaling)

        def next_status(seen: Seen[AgentStatus, AgentRead]) -> AgentStatus:
            if unscaled:  # the pass removed the ScaledObject, if any, before its status
                operator.without_scaled_object.add(key)
            messaging = seen.messaging
            usage = seen.previous.usage if spec.llm is not None else None
            scaling = scaling_step.Scaling(None, scaled_by=seen.scaled_by)
            if messaging is not None and seen.jetstream is not None:
                counts = seen.jetstream.counts
                messaging = dataclasses.replace(
                    messaging, counts=counts.consumers, dead_letters=counts.dead_letters
                )
                usage = counts.usage if spec.llm is not None else None
                scaling = seen.jetstream.scaling or scaling
            scaled_by = scaling.scaled_by or seen.scaled_by
            previous = _applicable(seen.previous, spec, scaled_by)
            return status.agent_status(
                previous,
                generation,
                seen.now,
                seen.workload,
                messaging=messaging,
                missing_secrets=seen.missing_secrets,
                config_hash=config_hash,
                llm_resolved=spec.llm is not None,
                autoscaling=autoscale.observation(
                    policy, scaling.decision, scaled_by, keda_served, owner.name
                ),
            ).model_copy(
                update={
                    "subjects": subjects,
                    "usage": usage,
                    "autoscale": autoscale.status(
                        policy,
                        scaling.decision,
                        scaled_by,
                        scaling.scaled_at,
                        previous.autoscale,
                    ),
                }
            )

        manifests = [
            workload.build_config_map(owner, config),
            workload.build_service_account(owner, spec),
            workload.build_deployment(owner, spec, config),
        ]
        if keda:
            assert policy is not None
            manifests.append(
                autoscale.build_scaled_object(
                    owner,
                    policy,
                    naming.agent_deployment(owner.name),
                    workload.agent_labels(owner.name),
                    resources.inbox.name or "",
                    [c.durable_name or "" for c in resources.consumers],
                    config.nats.url,
                )
            )
        return Plan(
            next_status,
            apply=[manifest for manifest in manifests if manifest is not None],
            remove=[("ScaledObject", owner.name)] if unscaled else [],
            secrets=[
                *workload.referenced_secrets(spec),
                *llm_builders.provider_secrets(resolution.runtime),
                *llm_builders.a2a_secrets(spec.llm),
            ],
            jetstream=JetStreamStep(spec.nats, config.nats.url, jetstream, config.nats.replicas),
            workload=self.workload(owner.name),
            config_maps=workload.referenced_config_maps(spec),
            directory=self._listing(
                operator,
                owner,
                spec,
                directory_builders.agent_entry(owner.namespace, owner.name, spec, generation),
            ),
        )

    def _listing(
        self,
        operator: Operator,
        owner: Owner,
        spec: AgentSpec,
        entry: DirectoryEntry | None,
    ) -> directory_builders.Listing:
        """The Agent's directory key: ``entry``, or (None) the stored one following Ready."""
        listed = directory_builders.listed(spec.nats, operator.settings.nats_url)
        return directory_builders.Listing(self.name, owner.namespace, owner.name, entry, listed)

    def _refused(
        self,
        operator: Operator,
        owner: Owner,
        spec: AgentSpec,
        generation: int,
        problems: list[Problem],
    ) -> Plan[AgentStatus, AgentRead]:
        """A plan that writes nothing and reports ``problems``, Secrets and the workload."""

        def next_status(seen: Seen[AgentStatus, AgentRead]) -> AgentStatus:
            return status.agent_status(
                _applicable(seen.previous, spec),
                generation,
                seen.now,
                seen.workload,
                missing_secrets=seen.missing_secrets,
            ).model_copy(update={"subjects": seen.previous.subjects})

        return Plan(
            next_status,
            secrets=workload.referenced_secrets(spec),
            workload=self.workload(owner.name),
            problems=problems,
            config_maps=workload.referenced_config_maps(spec),
            directory=self._listing(operator, owner, spec, None),
        )

    async def _resolve_llm(
        self, operator: Operator, owner: Owner, policy: LlmPolicy
    ) -> llm_builders.Resolution:
        """Read the ModelProviders and the Agents ``policy`` names, then resolve it."""
        providers = {
            name: _parsed(
                ModelProviderSpec,
                await operator.kube.read_custom("modelproviders", owner.namespace, name),
            )
            for name in llm_builders.provider_names(policy)
        }
        callees = {
            name: _parsed(
                AgentSpec, await operator.kube.read_custom(self.plural, owner.namespace, name)
            )
            for name in llm_builders.callee_names(policy)
        }
        return llm_builders.resolve(owner.namespace, policy, providers, callees)

    async def _declarers(
        self, operator: Operator, owner: Owner, spec: AgentSpec
    ) -> list[AgentSpec]:
        """The namespace's other Agents on the same NATS that are not being deleted: their
        declarations share the buckets' settings. One whose spec the models refuse
        declares nothing."""
        others = []
        for agent in await operator.kube.list_custom(self.plural, owner.namespace):
            metadata = agent["metadata"]
            if metadata["name"] == owner.name or "deletionTimestamp" in metadata:
                continue
            try:
                other = self.spec(agent.get("spec") or {})
            except ValidationError:
                continue
            if other.nats == spec.nats:
                others.append(other)
        return others

    def workload(self, name: str) -> str:
        return naming.agent_deployment(name)

    def refreshable(self, previous: AgentStatus) -> bool:
        return previous.observed_generation != 0

    def refreshed(
        self, previous: AgentStatus, workload: WorkloadObservation, now: datetime
    ) -> AgentStatus:
        return status.agent_status(
            previous, previous.observed_generation, now, workload
        ).model_copy(update={"subjects": previous.subjects})

    async def delete(
        self,
        operator: Operator,
        namespace: str,
        name: str,
        spec: AgentSpec | None,
        raw_spec: Mapping[str, Any],
    ) -> list[str]:
        """Withdraw its directory entry, then remove the agent's streams, and the shared ones
        no remaining Agent uses.

        With a spec the models refuse, only the streams its name derives: the shared ones
        it may have used cannot be told, so they stay.
        """
        operator.autoscaled.pop((namespace, name), None)
        operator.without_scaled_object.discard((namespace, name))
        withdrawn = await directory.withdraw(operator, self.name, namespace, name)
        if spec is None:
            connection = raw_connection(raw_spec)
            url = connection.url or operator.settings.nats_url
            target = await required_target(operator, namespace, connection, url)
            return withdrawn + await operator.nats.delete_streams(
                target, self.leftovers(namespace, name)
            )
        owner = Owner(namespace, name, uid="")
        config = workload.build_runtime_config(owner, spec, operator.settings.nats_url)
        target = await required_target(operator, namespace, spec.nats, config.nats.url)
        staying = await self._staying(operator, namespace, name)
        resources = build_agent_resources(config, workload.most_replicas(spec))
        # An Agent whose spec cannot be read may use any shared resource: keep them all.
        budgets = await budgets_staying(operator, namespace)
        shared = [] if staying is None else orphaned_streams(namespace, spec, staying, budgets)
        # Its session bucket is its own: it goes whether or not sessions are on now.
        own = [naming.kv_stream(naming.session_bucket(namespace, name))]
        return withdrawn + await operator.nats.delete(target, resources, [*shared, *own])

    def leftovers(self, namespace: str, name: str) -> list[str]:
        return [
            naming.inbox_stream(namespace, name),
            naming.advisory_stream(namespace, name),
            naming.dead_letter_stream(namespace, name),
            naming.kv_stream(naming.session_bucket(namespace, name)),
        ]

    async def _staying(
        self, operator: Operator, namespace: str, leaving: str
    ) -> list[AgentSpec] | None:
        """The other Agents of the namespace that keep their NATS resources: not being
        deleted, or deleted with deletionPolicy Retain. None when one of them has a spec
        the models refuse, so that its resources are never taken for orphans."""
        staying = []
        for agent in await operator.kube.list_custom(self.plural, namespace):
            if agent["metadata"]["name"] == leaving:
                continue
            try:
                spec = self.spec(agent.get("spec") or {})
            except ValidationError:
                logger.warning(
                    "Agent %s/%s has an invalid spec; keeping the shared NATS resources",
                    namespace,
                    agent["metadata"]["name"],
                )
                return None
            if "deletionTimestamp" not in agent["metadata"] or spec.deletion_policy == "Retain":
                staying.append(spec)
        return staying


AGENT = AgentKind()


def _parsed(
    model: type[AgentSpec] | type[ModelProviderSpec], body: Mapping[str, Any] | None
) -> Any:
    """An object's spec as ``model`` reads it; None when the object does not exist,
    ``llm_builders.INVALID`` when the models refuse its spec."""
    if body is None:
        return None
    try:
        return model.model_validate(body.get("spec") or {})
    except ValidationError:
        return llm_builders.INVALID


def _applicable(
    previous: AgentStatus, spec: AgentSpec, scaled_by: str | None = None
) -> AgentStatus:
    """``previous`` without the conditions that do not apply to ``spec`` (``LlmResolved`` for
    an Agent without ``spec.llm``, ``Autoscaled`` for one no one autoscales), and without
    usage or autoscale then."""
    if spec.runtime.autoscale is None and scaled_by is None:
        previous = status.without_condition(previous, status.AUTOSCALED).model_copy(
            update={"autoscale": None}
        )
    if spec.llm is not None:
        return previous
    return status.without_condition(previous, status.LLM_RESOLVED).model_copy(
        update={"usage": None}
    )


@dataclass(frozen=True)
class AgentRead:
    """What an Agent's JetStream step read, and what its autoscaler did."""

    counts: Counts
    scaling: scaling_step.Scaling | None = None


async def wake_agents(
    operator: Operator, namespace: str, provider: str | None = None, callee: str | None = None
) -> list[str]:
    """Run a pass over every Agent of ``namespace`` whose ``spec.llm`` names ``provider`` (as
    a model's provider) or ``callee`` (as an agent tool): their config embeds what it names,
    and one that waits for it turns Ready. Returns their names."""
    woken = []
    for agent in await operator.kube.list_custom(AGENT.plural, namespace):
        raw = agent.get("spec") or {}
        named = (provider is not None and llm_builders.names_provider(raw, provider)) or (
            callee is not None and llm_builders.calls_agent(raw, callee)
        )
        if named and "deletionTimestamp" not in agent["metadata"]:
            await run_pass(operator, AGENT, agent)
            woken.append(agent["metadata"]["name"])
    return woken
