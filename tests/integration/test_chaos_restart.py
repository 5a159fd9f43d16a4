"""A ChaosExperiment survives its operator: SIGKILLed mid-run and started again, the operator
resumes the same run from status (same id, same start, one RunStarted Event, one run
counted) and drives it to its verdict, with no probe lost. The module runs an operator of its
own, killed and started by the test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.integration.operator_support import (
    apply,
    explained,
    get,
    running_operator,
)
from tests.integration.test_chaos_operator import AGENT, _echo, _ended, _opt_in, experiment
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_devcluster.kube import core_v1

DEADLINE = 60.0


def _status(cluster: ClusterEndpoints, namespace: str) -> dict[str, Any]:
    found: dict[str, Any] = (
        get(cluster, namespace, "chaosexperiment", "resumed").get("status") or {}
    )
    return found


def test_a_run_resumes_after_the_operator_is_killed_mid_run(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, tmp_path: Path
) -> None:
    with running_operator(cluster, tmp_path / "operator.log") as operator:
        _opt_in(api_client, namespace)
        _echo(cluster, namespace, replicas=1)
        apply(
            cluster,
            namespace,
            experiment(
                "resumed",
                duration="10s",
                faults={"handler": {"latency": "10ms"}},
                steadyState={"probe": {"every": "500ms", "payload": "[]", "grace": "30s"}},
            ),
        )
        with explained(cluster, namespace, operator):
            before = wait_for(
                lambda: (
                    found
                    if (found := _status(cluster, namespace)).get("phase") == "Running"
                    and found.get("probeRounds", 0) >= 2
                    else None
                ),
                DEADLINE,
                "the run to be under way",
            )
            operator.kill()
            operator.start()
            status = _ended(cluster, namespace, "resumed")

        assert (status["run"], status["startedAt"]) == (before["run"], before["startedAt"])
        assert status["runs"] == 1
        assert status["verdict"] == "Passed", status
        assert status["figures"]["probesLost"] == 0
        assert status["figures"]["probesSent"] == status["probeRounds"] == 20
        events = core_v1(api_client).list_namespaced_event(
            namespace, field_selector="involvedObject.name=resumed"
        )
        assert [e.reason for e in events.items].count("RunStarted") == 1
        cluster.kubectl("delete", "-n", namespace, "chaosexperiment", "resumed")
        cluster.kubectl("delete", "-n", namespace, "agent", AGENT, "--wait=false")
