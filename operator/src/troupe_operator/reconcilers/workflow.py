"""Workflows: what a pass over one plans, and what deleting one removes from NATS.

A Workflow gets an engine only while it is valid (acyclic, every agent present): an
invalid one has its engine deleted, not scaled to zero, so that "no engine
Deployment" always means "nothing can run"; its runs wait in JetStream and resume
when it is fixed. Only the operator provisions the workflow's JetStream resources,
so deleting a Workflow need not wait for its engine to be gone.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from troupe_operator.api import AgentSpec, WorkflowSpec, WorkflowStatus
from troupe_operator.api.status import RunCounts, WorkflowSubjects
from troupe_operator.builders import budgets, dag, engine, pods, status, validation
from troupe_operator.builders import directory as directory_builders
from troupe_operator.builders.jetstream import workflow_spec_fields
from troupe_operator.builders.pods import Owner
from troupe_operator.builders.status import RunObservation, WorkloadObservation
from troupe_operator.clients.nats import NatsPool, NatsTarget
from troupe_operator.reconcilers import directory
from troupe_operator.reconcilers.agent import AGENT
from troupe_operator.reconcilers.common import (
    JetStreamStep,
    Kind,
    Operator,
    Plan,
    Seen,
    controlled_by,
    raw_connection,
    required_target,
    run_pass,
)
from troupe_runtime.contract import naming
from troupe_runtime.contract.gateway import DirectoryEntry
from troupe_runtime.contract.policies import Messaging
from troupe_runtime.contract.workflow_resources import build_workflow_resources


class WorkflowKind(Kind[WorkflowSpec, WorkflowStatus]):
    name = "Workflow"
    plural = "workflows"
    label = engine.WORKFLOW_LABEL
    spec_model = WorkflowSpec
    status_model = WorkflowStatus
    subconditions = status.WORKFLOW_SUBCONDITIONS
    advisories = status.WORKFLOW_ADVISORIES

    async def plan(
        self, operator: Operator, owner: Owner, spec: WorkflowSpec, generation: int
    ) -> Plan[WorkflowStatus, Any]:
        agent_specs = {
            agent["metadata"]["name"]: _agent_spec(agent)
            for agent in await operator.kube.list_custom(AGENT.plural, owner.namespace)
        }
        priority_levels = {
            name: (agent.messaging if agent else Messaging()).priority_levels
            for name, agent in agent_specs.items()
        }
        problems = budgets.budget_problems(
            spec, {name: agent for name, agent in agent_specs.items() if agent is not None}
        )
        subjects = WorkflowSubjects(
            trigger=spec.trigger.subject,
            start=naming.workflow_subject(owner.namespace, owner.name, "start"),
        )
        spec_problems = validation.workflow_problems(spec)
        graph = status.DagObservation(
            len(spec.steps),
            dag.workflow_cycles(spec),
            dag.unknown_agents(spec, set(priority_levels)),
        )
        if not graph.valid:

            def stopped(seen: Seen[WorkflowStatus, None]) -> WorkflowStatus:
                return status.workflow_status(
                    seen.previous, generation, seen.now, dag=graph, workload=status.ENGINE_STOPPED
                ).model_copy(update={"subjects": subjects})

            return Plan[WorkflowStatus, None](
                stopped,
                remove=self._engine_objects(owner.name),
                problems=spec_problems,
                directory=self._listing(operator, owner, spec, None),
            )

        config = engine.build_engine_config(
            owner,
            spec,
            operator.settings.nats_url,
            priority_levels,
            operator.settings.nats_replicas,
        )
        resources = build_workflow_resources(config)
        fields = workflow_spec_fields(resources)

        async def jetstream(nats: NatsPool, target: NatsTarget) -> RunObservation:
            await nats.provision_workflow(target, resources, fields)
            tally = await nats.runs(target, config)
            return RunObservation(
                RunCounts(
                    running=tally.running,
                    succeeded=tally.succeeded,
                    failed=tally.failed,
                    budget_exceeded=tally.budget_exceeded,
                    cancelled=tally.cancelled,
                ),
                status.last_run(tally.last),
            )

        def next_status(seen: Seen[WorkflowStatus, RunObservation]) -> WorkflowStatus:
            return status.workflow_status(
                seen.previous,
                generation,
                seen.now,
                dag=graph,
                workload=seen.workload,
                messaging=seen.messaging,
                missing_secrets=seen.missing_secrets,
                runs=seen.jetstream,
                budgets=problems,
            ).model_copy(update={"subjects": subjects})

        return Plan(
            next_status,
            apply=[
                engine.build_engine_config_map(owner, config),
                engine.build_engine_deployment(
                    owner, spec, config, operator.settings.runtime_image
                ),
            ],
            secrets=pods.nats_secrets(spec.nats),
            jetstream=JetStreamStep(spec.nats, config.nats.url, jetstream, config.nats.replicas),
            workload=self.workload(owner.name),
            problems=spec_problems,
            directory=self._listing(
                operator,
                owner,
                spec,
                directory_builders.workflow_entry(owner.namespace, owner.name, spec, generation),
            ),
        )

    def _listing(
        self,
        operator: Operator,
        owner: Owner,
        spec: WorkflowSpec,
        entry: DirectoryEntry | None,
    ) -> directory_builders.Listing:
        """The Workflow's directory key: ``entry``, or (None) the stored one following
        Ready (an invalid graph: its engine is gone, so Ready is False)."""
        listed = directory_builders.listed(spec.nats, operator.settings.nats_url)
        return directory_builders.Listing(self.name, owner.namespace, owner.name, entry, listed)

    def workload(self, name: str) -> str:
        return naming.engine_deployment(name)

    def refreshable(self, previous: WorkflowStatus) -> bool:
        """Also not while the workflow is invalid: its engine is on its way out."""
        return previous.observed_generation != 0 and not any(
            c.type in status.DAG_CONDITIONS and c.status != "True" for c in previous.conditions
        )

    def refreshed(
        self, previous: WorkflowStatus, workload: WorkloadObservation, now: datetime
    ) -> WorkflowStatus:
        return status.workflow_status(
            previous, previous.observed_generation, now, workload=workload
        ).model_copy(update={"subjects": previous.subjects})

    async def delete(
        self,
        operator: Operator,
        namespace: str,
        name: str,
        spec: WorkflowSpec | None,
        raw_spec: Mapping[str, Any],
    ) -> list[str]:
        """Stop the engine, then delete the workflow's stream, runs bucket and dead letters.

        The engine goes first so that it does not fail over its streams' loss; it never
        creates them, so there is no need to wait for its pods to be gone. Every name
        derives from the Workflow's, so a spec the models refuse deletes the same. An
        object of that name that is not this Workflow's stays. Its directory entry is
        withdrawn first, so the gateway starts no run meanwhile.
        """
        withdrawn = await directory.withdraw(operator, self.name, namespace, name)
        for kind, object_name in self._engine_objects(name):
            found = await operator.kube.read(kind, namespace, object_name)
            if found is not None and controlled_by(found, self.name, name):
                await operator.kube.delete(kind, namespace, object_name)
        connection = spec.nats if spec is not None else raw_connection(raw_spec)
        url = connection.url or operator.settings.nats_url
        target = await required_target(operator, namespace, connection, url)
        return withdrawn + await operator.nats.delete_streams(
            target, self.leftovers(namespace, name)
        )

    def leftovers(self, namespace: str, name: str) -> list[str]:
        return [
            naming.workflow_stream(namespace, name),
            naming.kv_stream(naming.workflow_runs_bucket(namespace, name)),
            naming.workflow_dead_letter_stream(namespace, name),
        ]

    def _engine_objects(self, name: str) -> list[tuple[str, str]]:
        return [
            ("Deployment", naming.engine_deployment(name)),
            ("ConfigMap", naming.engine_config_map(name)),
        ]


WORKFLOW = WorkflowKind()


def _agent_spec(agent: Mapping[str, Any]) -> AgentSpec | None:
    """An Agent's spec; None when it cannot be read, so one broken Agent does not stop
    every Workflow of its namespace (its own status says why): its priority levels are
    then the default and its budgets unchecked."""
    try:
        return AGENT.spec(agent.get("spec") or {})
    except ValidationError:
        return None


def waits_for(workflow: Mapping[str, Any], agent: str) -> bool:
    """Whether ``workflow`` (a raw body) last found ``agent`` missing and a step names it
    (as its agentRef or a fallback).

    Read raw and tolerantly: any Workflow, even one whose spec the models refuse, may ask.
    """
    conditions = _field(_field(workflow, "status"), "conditions")
    steps = _field(_field(workflow, "spec"), "steps")
    missing = isinstance(conditions, list) and any(
        isinstance(c, Mapping)
        and c.get("type") == status.AGENTS_FOUND
        and c.get("status") != "True"
        for c in conditions
    )
    named = isinstance(steps, list) and any(
        isinstance(s, Mapping) and (s.get("agentRef") == agent or _lists(s.get("fallbacks"), agent))
        for s in steps
    )
    return missing and named


def _lists(names: Any, agent: str) -> bool:
    return isinstance(names, list) and agent in names


def _field(holder: Any, key: str) -> Any:
    return holder.get(key) if isinstance(holder, Mapping) else None


async def wake_waiting(operator: Operator, namespace: str, agent: str) -> list[str]:
    """Run a pass over every Workflow of ``namespace`` that waits for ``agent``, so one
    applied before its Agents turns Ready as they appear, not at the next resync (Flux and
    Argo CD read the Stalled it showed meanwhile as a failure). Returns their names."""
    woken = []
    for body in await operator.kube.list_custom(WORKFLOW.plural, namespace):
        if waits_for(body, agent) and "deletionTimestamp" not in body["metadata"]:
            await run_pass(operator, WORKFLOW, body)
            woken.append(body["metadata"]["name"])
    return woken
