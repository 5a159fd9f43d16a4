"""ChaosExperiments against the real API server, operator, nats-server and process-node pods:
the API server refuses what the models refuse; an experiment in a Namespace that does not
opt in is Stalled and kills nothing; one in a Namespace that does, with pod kills and a short
run, ends Passed in status with the pods really replaced and no probe lost (the short chaos
test of ``make test``); a Workflow selector kills engine pods; one whose probes go unanswered
ends Failed with them lost; injected handler errors trip the abort threshold; added latency
breaks the hypothesis; a dead letter past the abort threshold ends the run Aborted at once,
its faults removed; and deleting an experiment mid-run removes its faults, even while no
operator runs (the next one's first sweep does)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import nats
import pytest
from pydantic import ValidationError

from tests.integration.operator_support import (
    API_VERSION,
    OperatorProcess,
    agent,
    apply,
    condition,
    explained,
    get,
    running_agent,
    wait_ready,
    workflow,
)
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_devcluster.kube import core_v1
from troupe_operator.api.chaos import ChaosExperimentSpec
from troupe_runtime.contract import naming
from troupe_runtime.contract.chaos import OPT_IN_LABEL, OPT_IN_VALUE, AgentFaults

DEADLINE = 60.0
AGENT = "echo"


def experiment(name: str, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "selector": {"agents": {"matchLabels": {"chaos": "yes"}}},
        "duration": "8s",
        "steadyState": {"probe": {"every": "500ms", "payload": "[]", "grace": "20s"}},
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "ChaosExperiment",
        "metadata": {"name": name},
        "spec": {**base, **spec},
    }


def _opt_in(api_client: Any, namespace: str) -> None:
    core_v1(api_client).patch_namespace(
        namespace, {"metadata": {"labels": {OPT_IN_LABEL: OPT_IN_VALUE}}}
    )


def _echo(cluster: ClusterEndpoints, namespace: str, replicas: int = 2) -> None:
    manifest = running_agent(AGENT, runtime={"replicas": replicas})
    manifest["metadata"]["labels"] = {"chaos": "yes"}
    apply(cluster, namespace, manifest)
    wait_ready(cluster, namespace, "agent", AGENT)


def _pod_uids(api_client: Any, namespace: str) -> set[str]:
    pods = core_v1(api_client).list_namespaced_pod(
        namespace, label_selector=f"troupe.dev/agent={AGENT}"
    )
    return {p.metadata.uid for p in pods.items if p.metadata.deletion_timestamp is None}


def _ended(cluster: ClusterEndpoints, namespace: str, name: str) -> dict[str, Any]:
    def verdict() -> dict[str, Any] | None:
        status = get(cluster, namespace, "chaosexperiment", name).get("status") or {}
        return status if status.get("verdict") else None

    found: dict[str, Any] = wait_for(verdict, DEADLINE, f"a verdict on {name}")
    return found


def _faults(nats_url: str, namespace: str, agent: str) -> AgentFaults | None:
    async def read() -> AgentFaults | None:
        connection = await nats.connect(nats_url)
        try:
            kv = await connection.jetstream().key_value(naming.chaos_bucket(namespace))
            entry = await kv.get(naming.chaos_faults_key(agent))
        except Exception:
            return None
        finally:
            await connection.close()
        return AgentFaults.model_validate_json(entry.value) if entry.value else None

    return asyncio.run(read())


def _publish(nats_url: str, subject: str, payload: bytes) -> None:
    async def send() -> None:
        connection = await nats.connect(nats_url)
        try:
            await connection.jetstream().publish(subject, payload)
        finally:
            await connection.close()

    asyncio.run(send())


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ({"selector": {}}, "selector needs agents or workflows"),
        ({"duration": "25h"}, "duration may be at most 24h"),
        ({"faults": {"handler": {"errorRatio": 2}}}, "errorRatio"),
        ({"faults": {"podKills": {"every": "soon"}}}, "podKills.every"),
    ],
    ids=["no-selector", "too-long", "ratio-above-1", "not-a-duration"],
)
def test_the_api_server_refuses_what_the_models_refuse(
    cluster: ClusterEndpoints,
    namespace: str,
    operator: OperatorProcess,
    spec: dict[str, Any],
    said: str,
) -> None:
    manifest = experiment("refused", **spec)
    answer = cluster.kubectl(
        "apply",
        "-n",
        namespace,
        "--dry-run=server",
        "-f",
        "-",
        stdin=json.dumps(manifest),
        check=False,
    )
    assert said in answer, answer
    with pytest.raises(ValidationError):
        ChaosExperimentSpec.model_validate(manifest["spec"])


def test_a_namespace_that_does_not_opt_in_is_stalled_and_loses_no_pod(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    _echo(cluster, namespace, replicas=1)
    pods = _pod_uids(api_client, namespace)
    apply(
        cluster,
        namespace,
        experiment("refused", duration="3s", faults={"podKills": {"every": "1s"}}),
    )
    with explained(cluster, namespace, operator):
        stalled = wait_for(
            lambda: (
                found
                if (
                    found := condition(
                        get(cluster, namespace, "chaosexperiment", "refused"), "Stalled"
                    )
                )
                and found["status"] == "True"
                else None
            ),
            DEADLINE,
            "the experiment to stall",
        )
    assert stalled["reason"] == "NamespaceNotOptedIn"
    assert OPT_IN_LABEL in stalled["message"]
    body = get(cluster, namespace, "chaosexperiment", "refused")
    assert body["status"]["phase"] == "Pending"
    assert not body["status"].get("run")
    assert _pod_uids(api_client, namespace) == pods
    cluster.kubectl("delete", "-n", namespace, "chaosexperiment", "refused")
    cluster.kubectl("delete", "-n", namespace, "agent", AGENT, "--wait=false")


def test_pod_kills_in_an_opted_in_namespace_end_passed_with_new_pods_and_nothing_lost(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    _opt_in(api_client, namespace)
    _echo(cluster, namespace)
    before = _pod_uids(api_client, namespace)
    apply(
        cluster,
        namespace,
        experiment(
            "kills",
            faults={
                "podKills": {"every": "3s", "graceful": True},
                "handler": {"latency": "10ms"},
            },
            steadyState={
                "minSuccessRatio": 1,
                "maxDeadLetters": 0,
                "probe": {"every": "500ms", "payload": "[]", "grace": "30s"},
            },
        ),
    )
    with explained(cluster, namespace, operator):
        wait_for(
            lambda: _faults(cluster.nats_url, namespace, AGENT) or None,
            DEADLINE,
            "the run's faults in the chaos bucket",
        )
        status = _ended(cluster, namespace, "kills")
    figures = status["figures"]
    assert status["verdict"] == "Passed", status
    assert status["phase"] == "Passed"
    assert figures["podsKilled"] >= 1
    assert figures["probesLost"] == 0
    assert figures["probesSent"] == figures["probesAnswered"] > 0
    assert figures["successRatio"] == 1
    assert status["targets"]["agents"] == [AGENT]
    assert before - _pod_uids(api_client, namespace), "a pod the run started with is gone"
    held = condition(get(cluster, namespace, "chaosexperiment", "kills"), "SteadyStateHeld")
    assert held is not None
    assert held["status"] == "True"
    ready = condition(get(cluster, namespace, "chaosexperiment", "kills"))
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("True", "Passed")
    assert _faults(cluster.nats_url, namespace, AGENT) is None
    metrics = _scrape(operator)
    assert (
        f'troupe_chaos_probes{{experiment="kills",namespace="{namespace}",outcome="lost"}} 0.0'
        in metrics
    )
    cluster.kubectl("delete", "-n", namespace, "chaosexperiment", "kills")
    cluster.kubectl("delete", "-n", namespace, "agent", AGENT, "--wait=false")


def _scrape(operator: OperatorProcess) -> str:
    with urllib.request.urlopen(operator.metrics_url, timeout=5) as response:
        return str(response.read().decode())


def test_a_workflow_selector_kills_its_engine_pods(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    _opt_in(api_client, namespace)
    _echo(cluster, namespace, replicas=1)
    flow = workflow("flow", [{"name": "only", "agentRef": AGENT}])
    flow["metadata"]["labels"] = {"chaos": "yes"}
    apply(cluster, namespace, flow)
    wait_ready(cluster, namespace, "workflow", "flow")
    engines = core_v1(api_client).list_namespaced_pod(
        namespace, label_selector="troupe.dev/workflow=flow"
    )
    before = {p.metadata.uid for p in engines.items}
    assert before, "the engine runs"
    apply(
        cluster,
        namespace,
        experiment(
            "engines",
            selector={"workflows": {"matchLabels": {"chaos": "yes"}}},
            duration="3s",
            faults={"podKills": {"every": "1s"}},
        ),
    )
    with explained(cluster, namespace, operator):
        status = _ended(cluster, namespace, "engines")
    assert status["verdict"] == "Passed", status
    assert status["targets"]["workflows"] == ["flow"]
    assert status["figures"]["podsKilled"] >= 1
    assert status["figures"]["probesSent"] == 0
    after = core_v1(api_client).list_namespaced_pod(
        namespace, label_selector="troupe.dev/workflow=flow"
    )
    assert before - {p.metadata.uid for p in after.items}, "the engine pod was replaced"
    cluster.kubectl("delete", "-n", namespace, "chaosexperiment", "engines")
    cluster.kubectl("delete", "-n", namespace, "workflow", "flow", "--wait=false")
    cluster.kubectl("delete", "-n", namespace, "agent", AGENT, "--wait=false")


def test_a_run_whose_probes_go_unanswered_ends_failed_with_them_lost(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    _opt_in(api_client, namespace)
    # Its pods land on kwok nodes: Ready, but nothing runs, so no probe is ever answered.
    manifest = agent(AGENT)
    manifest["metadata"]["labels"] = {"chaos": "yes"}
    apply(cluster, namespace, manifest)
    wait_ready(cluster, namespace, "agent", AGENT)
    apply(
        cluster,
        namespace,
        experiment(
            "silent",
            duration="2s",
            steadyState={"probe": {"every": "500ms", "payload": "[]", "grace": "2s"}},
        ),
    )
    with explained(cluster, namespace, operator):
        status = _ended(cluster, namespace, "silent")
    assert status["verdict"] == "Failed", status
    assert status["figures"]["probesLost"] == status["figures"]["probesSent"] > 0
    assert "probes lost" in status["verdictReason"]
    held = condition(get(cluster, namespace, "chaosexperiment", "silent"), "SteadyStateHeld")
    assert held is not None
    assert held["status"] == "False"
    cluster.kubectl("delete", "-n", namespace, "chaosexperiment", "silent")
    cluster.kubectl("delete", "-n", namespace, "agent", AGENT, "--wait=false")


def test_handler_errors_past_the_abort_threshold_abort_the_run(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    _opt_in(api_client, namespace)
    manifest = running_agent(AGENT, retry={"maxAttempts": 1})
    manifest["metadata"]["labels"] = {"chaos": "yes"}
    apply(cluster, namespace, manifest)
    wait_ready(cluster, namespace, "agent", AGENT)
    apply(
        cluster,
        namespace,
        experiment(
            "failing",
            duration="60s",
            faults={"handler": {"errorRatio": 1}},
            abort={"minSuccessRatio": 0.5, "minProbes": 3},
        ),
    )
    with explained(cluster, namespace, operator):
        status = _ended(cluster, namespace, "failing")
    assert status["verdict"] == "Aborted", status
    assert "abort.minSuccessRatio" in status["verdictReason"]
    assert status["figures"]["probesFailed"] >= 3
    assert status["figures"]["probesAnswered"] == 0
    assert _faults(cluster.nats_url, namespace, AGENT) is None
    cluster.kubectl("delete", "-n", namespace, "chaosexperiment", "failing")
    cluster.kubectl("delete", "-n", namespace, "agent", AGENT, "--wait=false")


def test_added_handler_latency_past_the_hypothesis_ends_failed(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    _opt_in(api_client, namespace)
    _echo(cluster, namespace, replicas=1)
    apply(
        cluster,
        namespace,
        experiment(
            "slow",
            duration="3s",
            faults={"handler": {"latency": "400ms"}},
            steadyState={
                "maxP95Latency": "200ms",
                "probe": {"every": "1s", "payload": "[]", "grace": "20s"},
            },
        ),
    )
    with explained(cluster, namespace, operator):
        status = _ended(cluster, namespace, "slow")
    assert status["verdict"] == "Failed", status
    assert "maxP95Latency" in status["verdictReason"]
    assert status["figures"]["probesLost"] == 0
    cluster.kubectl("delete", "-n", namespace, "chaosexperiment", "slow")
    cluster.kubectl("delete", "-n", namespace, "agent", AGENT, "--wait=false")


def test_a_dead_letter_past_the_abort_threshold_aborts_the_run_and_removes_its_faults(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    _opt_in(api_client, namespace)
    _echo(cluster, namespace, replicas=1)
    apply(
        cluster,
        namespace,
        experiment(
            "tripped",
            duration="60s",
            faults={"handler": {"latency": "10ms"}},
            abort={"maxDeadLetters": 0},
        ),
    )
    with explained(cluster, namespace, operator):
        wait_for(
            lambda: _faults(cluster.nats_url, namespace, AGENT),
            DEADLINE,
            "the run's faults in the chaos bucket",
        )
        # Not a CloudEvent: the runtime dead-letters it as malformed.
        _publish(cluster.nats_url, naming.inbox_subject(namespace, AGENT, 0), b"not an event")
        status = _ended(cluster, namespace, "tripped")
    assert status["verdict"] == "Aborted", status
    assert "abort.maxDeadLetters" in status["verdictReason"]
    assert status["figures"]["deadLettersAfter"] > status["figures"]["deadLettersBefore"]
    assert _faults(cluster.nats_url, namespace, AGENT) is None
    cluster.kubectl("delete", "-n", namespace, "chaosexperiment", "tripped")
    cluster.kubectl("delete", "-n", namespace, "agent", AGENT, "--wait=false")


def test_deleting_an_experiment_mid_run_removes_its_faults(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    _opt_in(api_client, namespace)
    _echo(cluster, namespace, replicas=1)
    apply(
        cluster,
        namespace,
        experiment("gone", duration="5m", faults={"handler": {"latency": "10ms"}}),
    )
    with explained(cluster, namespace, operator):
        wait_for(
            lambda: _faults(cluster.nats_url, namespace, AGENT),
            DEADLINE,
            "the run's faults in the chaos bucket",
        )
        cluster.kubectl("delete", "-n", namespace, "chaosexperiment", "gone", "--timeout=20s")
        wait_for(
            lambda: _faults(cluster.nats_url, namespace, AGENT) is None,
            DEADLINE,
            "the faults to be removed",
        )
    cluster.kubectl("delete", "-n", namespace, "agent", AGENT, "--wait=false")


def test_an_experiment_deleted_while_the_operator_is_down_loses_its_faults_after_restart(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    # Its DELETED event is never seen, and the new operator has written no faults itself:
    # only the first sweep over every chaos bucket finds the orphaned entry.
    _opt_in(api_client, namespace)
    _echo(cluster, namespace, replicas=1)
    apply(
        cluster,
        namespace,
        experiment("unwatched", duration="5m", faults={"handler": {"latency": "10ms"}}),
    )
    with explained(cluster, namespace, operator):
        wait_for(
            lambda: _faults(cluster.nats_url, namespace, AGENT),
            DEADLINE,
            "the run's faults in the chaos bucket",
        )
        operator.kill()
        try:
            cluster.kubectl(
                "delete", "-n", namespace, "chaosexperiment", "unwatched", "--timeout=20s"
            )
        finally:
            operator.start()
        wait_for(
            lambda: _faults(cluster.nats_url, namespace, AGENT) is None,
            DEADLINE,
            "the orphaned faults to be purged",
        )
    cluster.kubectl("delete", "-n", namespace, "agent", AGENT, "--wait=false")
