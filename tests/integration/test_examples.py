"""The examples are real: their manifests pass the API server's validation, and the
support-triage handlers behave as its README says on a real nats-server."""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import nats
import pytest

from tests.integration.workflow_harness import agents, engine, engine_config, new_namespace, result
from troupe_devcluster.fixtures import ClusterEndpoints
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.envelope import CloudEvent

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("example", ["research-team", "support-triage"])
def test_the_example_manifests_pass_server_side_validation(
    example: str, cluster: ClusterEndpoints, namespace: str
) -> None:
    cluster.kubectl("apply", "-f", str(EXAMPLES.parent / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "-f", str(EXAMPLES.parent / "crds"))
    applied = cluster.kubectl(
        "apply", "--dry-run=server", "-k", str(EXAMPLES / example), "-n", namespace
    )
    assert "agent.troupe.dev" in applied
    assert "workflow.troupe.dev" in applied
    if example == "research-team":
        assert "budget.troupe.dev/research-daily" in applied


async def test_support_triage_answers_by_priority_and_dead_letters_abuse(nats_url: str) -> None:
    support = load(EXAMPLES / "support-triage" / "handlers" / "support.py")
    ns = new_namespace()
    steps = [
        {"name": "classify", "agent": "classifier", "priorityLevels": 3},
        {"name": "respond", "agent": "responder", "dependsOn": ["classify"], "priorityLevels": 3},
    ]
    config = engine_config(nats_url, ns, steps)
    handlers = {"classifier": support.classify, "responder": support.respond}
    nc = await nats.connect(nats_url)
    js = nc.jetstream()

    async def start(ticket: dict[str, Any], priority: int) -> str:
        run = uuid.uuid4().hex
        event = CloudEvent(id=run, source="/tests", type="ticket", priority=priority, data=ticket)
        headers, payload = envelope.to_binary(event)
        await js.publish(config.trigger_subject, payload, headers=headers)
        return run

    async with (
        agents(nats_url, ns, handlers, messaging={"priorityLevels": 3}),
        engine(config),
    ):
        urgent = await result(js, config, await start({"id": "T-1", "text": "site down"}, 2))
        abusive = await result(js, config, await start({"id": "T-2", "text": "stupid bot"}, 0))
        letters = await js.stream_info(naming.dead_letter_stream(ns, "responder"))
    await nc.close()
    assert urgent["status"] == "Succeeded"
    assert urgent["output"]["category"] == "outage"
    assert urgent["output"]["priority"] == 2
    assert abusive["status"] == "Failed"
    assert "Abusive" in abusive["error"]
    assert letters.state.messages == 1
