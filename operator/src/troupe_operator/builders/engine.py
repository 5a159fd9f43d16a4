"""A Workflow spec → its engine's config, ConfigMap and Deployment.

Each valid Workflow runs in an engine of its own: one pod running
``python -m troupe_runtime.workflow``, reading the runtime's own ``EngineConfig``
(JSON from the ConfigMap ``<workflow>-engine``, mounted as a file at ``pod.CONFIG_PATH``).
Steps carry their agents' inbox subjects, so the engine needs no Kubernetes access.
The Deployment uses the ``Recreate`` strategy, but that alone does not keep two engines
apart (a deleted pod's successor starts while it terminates): the engines' lease, fenced
by the server, does (``troupe_runtime.workflow.lease``). Its pods share the
agents' restricted security context, probes and annotations (``builders.pods``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from troupe_operator.api import WorkflowSpec, WorkflowStep
from troupe_operator.builders import pods
from troupe_operator.builders.pods import FIELD_MANAGER, Owner
from troupe_runtime.contract import naming, pod
from troupe_runtime.contract.approvals import Approvers
from troupe_runtime.contract.engine_config import (
    EngineApproval,
    EngineCompensation,
    EngineConfig,
    EngineStep,
    StepAgent,
)

WORKFLOW_LABEL = "troupe.dev/workflow"


def engine_name(workflow: str) -> str:
    """The engine's Deployment and ConfigMap."""
    return naming.engine_deployment(workflow)


def engine_labels(workflow: str) -> dict[str, str]:
    """Labels on every object of a workflow's engine; its Deployment selects pods by these."""
    return {
        "app.kubernetes.io/name": "troupe-workflow-engine",
        "app.kubernetes.io/instance": workflow,
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        WORKFLOW_LABEL: workflow,
    }


def _approval_step(step: WorkflowStep) -> EngineStep:
    """An approval step: who decides, what they read, how long the run waits."""
    assert step.approval is not None
    approval = step.approval
    fields: dict[str, Any] = {}
    if approval.timeout is not None:
        fields["timeout"] = approval.timeout
    return EngineStep(
        name=step.name,
        depends_on=step.depends_on,
        on_failure=step.on_failure,
        approval=EngineApproval(
            approvers=Approvers(users=approval.approvers.users, groups=approval.approvers.groups),
            message=approval.message,
            on_timeout=approval.on_timeout,
            **fields,
        ),
    )


def _engine_step(namespace: str, step: WorkflowStep, levels: Mapping[str, int]) -> EngineStep:
    """A step with its agent's inbox subject, and its fallbacks' (each with its own
    priority levels); unset timeout and retry keep the engine's defaults (5 minutes, one
    attempt)."""
    if step.agent_ref is None:
        return _approval_step(step)
    fields: dict[str, Any] = {}
    if step.fallbacks:
        fields["fallbacks"] = [
            StepAgent(
                agent=name,
                subject=naming.inbox_subject(namespace, name, 0),
                priority_levels=levels.get(name, 1),
            )
            for name in step.fallbacks
        ]
    if step.timeout is not None:
        fields["timeout"] = step.timeout
    if step.retry is not None:
        fields["retry"] = step.retry
    if step.compensation is not None:
        fields["compensation"] = EngineCompensation(
            subject=naming.inbox_subject(namespace, step.compensation.agent_ref, 0),
            input=step.compensation.input,
        )
    return EngineStep(
        name=step.name,
        agent=step.agent_ref,
        subject=naming.inbox_subject(namespace, step.agent_ref, 0),
        depends_on=step.depends_on,
        input=step.input,
        on_failure=step.on_failure,
        priority_levels=levels.get(step.agent_ref, 1),
        **fields,
    )


def build_engine_config(
    owner: Owner,
    spec: WorkflowSpec,
    default_nats_url: str,
    priority_levels: Mapping[str, int] | None = None,
    default_replicas: int = 1,
) -> EngineConfig:
    """The engine's config. Call it for a valid spec: no cycle, every agentRef an Agent.

    ``priority_levels`` (per agent) lets a run's priority reach the agents' inboxes.
    """
    levels = priority_levels or {}
    return EngineConfig(
        workflow=owner.name,
        namespace=owner.namespace,
        trigger_subject=spec.trigger.subject,
        steps=[_engine_step(owner.namespace, step, levels) for step in spec.steps],
        deadline=spec.deadline,
        max_concurrent_runs=spec.max_concurrent_runs,
        dead_letter=spec.dead_letter,
        retention=spec.retention,
        nats=pods.nats_settings(spec.nats, default_nats_url, default_replicas),
    )


def build_engine_config_map(owner: Owner, config: EngineConfig) -> dict[str, Any]:
    return pods.config_map(
        owner, naming.engine_config_map(owner.name), engine_labels(owner.name), config.to_json()
    )


def build_engine_deployment(
    owner: Owner, spec: WorkflowSpec, config: EngineConfig, image: str
) -> dict[str, Any]:
    """One engine replica, replaced with ``Recreate``, restricted like the agents' pods."""
    secret_volumes, secret_mounts = pods.nats_secret_volumes(spec.nats)
    container = pods.runtime_container(
        pods.Container(
            image=image,
            image_pull_policy="IfNotPresent",
            command=list(pod.ENGINE_COMMAND),
            health_port=config.health_port,
            extra_env=[],
            secret_mounts=secret_mounts,
        )
    )
    return pods.deployment(
        owner,
        engine_name(owner.name),
        engine_labels(owner.name),
        {WORKFLOW_LABEL: owner.name},
        1,
        config.to_json(),
        config.health_port,
        pods.restricted_pod_spec([container], naming.engine_config_map(owner.name), secret_volumes),
        strategy={"type": "Recreate"},
    )
