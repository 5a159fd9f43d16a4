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
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from troupe_operator.api import AgentSpec, AgentStatus
from troupe_operator.api.status import AgentSubjects
from troupe_operator.builders import jetstream as jetstream_builders
from troupe_operator.builders import status, validation, workload
from troupe_operator.builders.jetstream import orphaned_streams
from troupe_operator.builders.pods import Owner
from troupe_operator.builders.problems import Problem
from troupe_operator.builders.status import WorkloadObservation
from troupe_operator.clients.nats import Counts, NatsPool, NatsTarget
from troupe_operator.reconcilers.common import (
    JetStreamStep,
    Kind,
    Operator,
    Plan,
    Seen,
    raw_connection,
    required_target,
)
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_resources import build_agent_resources, inbox_subjects

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
    ) -> Plan[AgentStatus, Counts]:
        problems = validation.agent_problems(spec)
        if problems:
            # Nothing is built from a spec with problems: it is only reported (and building
            # may itself fail, e.g. on a schema nested too deep to serialise).
            return self._refused(owner, spec, generation, problems)
        config = workload.build_runtime_config(owner, spec, operator.settings.nats_url)
        resources = jetstream_builders.with_shared_buckets(
            build_agent_resources(config, spec.runtime.replicas),
            owner.namespace,
            spec,
            await self._declarers(operator, owner, spec) if spec.state else [],
        )
        fields = jetstream_builders.agent_spec_fields(owner.namespace, resources, spec)
        config_hash = workload.config_hash(config)
        subjects = AgentSubjects(
            inbox=inbox_subjects(config), dead_letters=config.dead_letter_subject
        )

        async def jetstream(nats: NatsPool, target: NatsTarget) -> Counts:
            await nats.provision(target, resources, fields)
            return await nats.counts(target, resources)

        def next_status(seen: Seen[AgentStatus, Counts]) -> AgentStatus:
            messaging = seen.messaging
            if messaging is not None and seen.jetstream is not None:
                counts = seen.jetstream
                messaging = dataclasses.replace(
                    messaging, counts=counts.consumers, dead_letters=counts.dead_letters
                )
            return status.agent_status(
                seen.previous,
                generation,
                seen.now,
                seen.workload,
                messaging=messaging,
                missing_secrets=seen.missing_secrets,
                config_hash=config_hash,
            ).model_copy(update={"subjects": subjects})

        manifests = [
            workload.build_config_map(owner, config),
            workload.build_service_account(owner, spec),
            workload.build_deployment(owner, spec, config),
        ]
        return Plan(
            next_status,
            apply=[manifest for manifest in manifests if manifest is not None],
            secrets=workload.referenced_secrets(spec),
            jetstream=JetStreamStep(spec.nats, config.nats.url, jetstream),
            workload=self.workload(owner.name),
            config_maps=workload.referenced_config_maps(spec),
        )

    def _refused(
        self, owner: Owner, spec: AgentSpec, generation: int, problems: list[Problem]
    ) -> Plan[AgentStatus, Counts]:
        """A plan that writes nothing and reports ``problems``, Secrets and the workload."""

        def next_status(seen: Seen[AgentStatus, Counts]) -> AgentStatus:
            return status.agent_status(
                seen.previous,
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
        )

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
        """Remove the agent's streams, and the shared ones no remaining Agent uses.

        With a spec the models refuse, only the streams its name derives: the shared ones
        it may have used cannot be told, so they stay.
        """
        if spec is None:
            connection = raw_connection(raw_spec)
            url = connection.url or operator.settings.nats_url
            target = await required_target(operator, namespace, connection, url)
            return await operator.nats.delete_streams(target, self.leftovers(namespace, name))
        owner = Owner(namespace, name, uid="")
        config = workload.build_runtime_config(owner, spec, operator.settings.nats_url)
        target = await required_target(operator, namespace, spec.nats, config.nats.url)
        staying = await self._staying(operator, namespace, name)
        resources = build_agent_resources(config, spec.runtime.replicas)
        # An Agent whose spec cannot be read may use any shared resource: keep them all.
        shared = [] if staying is None else orphaned_streams(namespace, spec, staying)
        return await operator.nats.delete(target, resources, shared)

    def leftovers(self, namespace: str, name: str) -> list[str]:
        return [
            naming.inbox_stream(namespace, name),
            naming.advisory_stream(namespace, name),
            naming.dead_letter_stream(namespace, name),
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
