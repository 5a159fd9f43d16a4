"""An Agent KEDA does not scale is not looked up for a ScaledObject on every pass: once a
pass has removed (or found no) ScaledObject, the next passes plan no removal, until the Agent
asks for KEDA again or a new operator process starts (issue 18: quiet at 1000 Agents)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from troupe_operator.api import AgentSpec, AgentStatus
from troupe_operator.builders.pods import Owner
from troupe_operator.builders.status import WorkloadObservation
from troupe_operator.reconcilers.agent import AGENT
from troupe_operator.reconcilers.common import Operator, Plan, Seen
from troupe_operator.settings import OperatorSettings

OWNER = Owner(namespace="research", name="summariser", uid="0b1c2d3e-0000-4000-8000-000000000001")
SCALED_OBJECT = [("ScaledObject", "summariser")]


class KedaServed:
    """The one Kubernetes read a plain Agent's plan makes: KEDA's CRD is served."""

    async def has_crd(self, name: str) -> bool:
        return True


def operator() -> Operator:
    nats: Any = None
    return Operator(kube=KedaServed(), nats=nats, settings=OperatorSettings())  # type: ignore[arg-type]


def spec(autoscale: dict[str, Any] | None = None) -> AgentSpec:
    runtime: dict[str, Any] = {}
    if autoscale is not None:
        runtime["autoscale"] = autoscale
    return AgentSpec.model_validate({"role": "r", "runtime": runtime})


def plan(op: Operator, agent: AgentSpec) -> Plan[AgentStatus, Any]:
    return asyncio.run(AGENT.plan(op, OWNER, agent, 1))


def converged(done: Plan[AgentStatus, Any]) -> None:
    """What converge does last, once the plan's removals went through: the status."""
    workload = WorkloadObservation(desired=1, ready=1, updated=1, current_generation=True)
    done.status(Seen(AgentStatus(), datetime.now(UTC), workload, [], None, None))


def test_a_plain_agent_is_looked_up_once_then_not_again() -> None:
    op = operator()
    first = plan(op, spec())
    assert first.remove == SCALED_OBJECT
    assert plan(op, spec()).remove == SCALED_OBJECT  # not converged yet: looked up again
    converged(first)
    assert plan(op, spec()).remove == []


def test_an_agent_that_was_scaled_by_keda_again_is_looked_up_after_leaving_it() -> None:
    op = operator()
    converged(plan(op, spec()))
    keda = plan(op, spec({"engine": "keda", "minReplicas": 0}))
    assert keda.remove == []
    converged(keda)
    assert plan(op, spec()).remove == SCALED_OBJECT


def test_a_new_operator_process_looks_again() -> None:
    converged(plan(operator(), spec()))
    assert plan(operator(), spec()).remove == SCALED_OBJECT
