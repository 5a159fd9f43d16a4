"""The autoscaler's polling loop runs an Agent's pass when its reading says replicas should
change, and polls it again only once a pass has scaled it: a pass that cannot (its spec
refused, a Secret missing, NATS gone) must not be run again at every look on stale facts."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from troupe_operator.api.agent import AgentAutoscale
from troupe_operator.builders.autoscale import Backlog
from troupe_operator.clients.nats import NatsTarget
from troupe_operator.reconcilers import autoscaler
from troupe_operator.reconcilers.common import Autoscaled, Operator
from troupe_operator.settings import OperatorSettings

KEY = ("research", "summariser")
LONG_AGO = datetime.now(UTC) - timedelta(hours=1)


class Idle:
    """Consumers with nothing pending for an hour: an agent at one replica should go to 0."""

    async def backlog(self, _target: Any, _resources: Any) -> Backlog:
        return Backlog(0, 0, LONG_AGO)


class Agents:
    async def read_custom(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        return {"metadata": {"namespace": namespace, "name": name}}


def watched() -> Autoscaled:
    policy = AgentAutoscale.model_validate({"minReplicas": 0, "scaleToZeroAfter": "30s"})
    resources: Any = None
    return Autoscaled(NatsTarget("nats://x:4222"), resources, policy, 1, LONG_AGO)


def test_a_pass_that_does_not_scale_the_agent_is_not_run_again_at_every_look(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    passes: list[str] = []

    async def refused(_operator: Any, _kind: Any, body: dict[str, Any]) -> None:
        passes.append(body["metadata"]["name"])  # a refused spec: nothing scaled

    monkeypatch.setattr(autoscaler, "run_pass", refused)
    kube: Any = Agents()
    nats: Any = Idle()
    operator = Operator(kube=kube, nats=nats, settings=OperatorSettings())
    operator.autoscaled[KEY] = watched()
    assert asyncio.run(autoscaler.autoscale_once(operator)) == ["research/summariser"]
    assert asyncio.run(autoscaler.autoscale_once(operator)) == []
    assert passes == ["summariser"]


def test_a_pass_that_scales_the_agent_keeps_it_polled(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scaled(operator: Operator, _kind: Any, _body: dict[str, Any]) -> None:
        done = watched()
        done.current = 0  # scale_agent registers what it converged to
        operator.autoscaled[KEY] = done

    monkeypatch.setattr(autoscaler, "run_pass", scaled)
    kube: Any = Agents()
    nats: Any = Idle()
    operator = Operator(kube=kube, nats=nats, settings=OperatorSettings())
    operator.autoscaled[KEY] = watched()
    assert asyncio.run(autoscaler.autoscale_once(operator)) == ["research/summariser"]
    assert operator.autoscaled[KEY].current == 0
    assert asyncio.run(autoscaler.autoscale_once(operator)) == []  # at 0 and idle: no change


def test_a_pass_blocked_by_nats_is_retried_at_the_next_look(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    passes: list[str] = []

    async def blocked(_operator: Any, _kind: Any, body: dict[str, Any]) -> str:
        passes.append(body["metadata"]["name"])
        return "NATS unavailable"

    monkeypatch.setattr(autoscaler, "run_pass", blocked)
    kube: Any = Agents()
    nats: Any = Idle()
    operator = Operator(kube=kube, nats=nats, settings=OperatorSettings())
    operator.autoscaled[KEY] = watched()
    asyncio.run(autoscaler.autoscale_once(operator))
    asyncio.run(autoscaler.autoscale_once(operator))
    assert passes == ["summariser", "summariser"]
