"""Deleting a Budget is never blocked for good: with its NATS unreachable the operator
reports MessagingUnavailable, retries the cleanup until the finalizer timeout, then lets the
Budget go with a Warning Event naming what it left behind (a real API server and operator,
pointed at a NATS port nothing listens on)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.integration.operator_support import OperatorProcess, apply, condition, explained, get
from tests.integration.test_budgets_operator import budget
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for

DEADLINE = 60.0
FINALIZER_TIMEOUT_SECONDS = 5


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    return {
        "TROUPE_NATS_URL": "nats://127.0.0.1:1",
        "TROUPE_FINALIZER_TIMEOUT": str(FINALIZER_TIMEOUT_SECONDS),
        "TROUPE_BUDGET_REFRESH": "1",
    }


def test_a_budget_whose_nats_is_down_is_let_go_after_the_finalizer_timeout(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    with explained(cluster, namespace, operator):
        apply(cluster, namespace, budget("stranded"))

        def unavailable() -> dict[str, Any] | None:
            body = get(cluster, namespace, "budget", "stranded")
            ready = condition(body)
            return body if ready and ready["reason"] == "MessagingUnavailable" else None

        body = wait_for(unavailable, DEADLINE, "Ready=False MessagingUnavailable")
        assert "nats://127.0.0.1:1" in (condition(body) or {})["message"]

        cluster.kubectl("delete", "budget", "stranded", "-n", namespace, "--wait=false")

        wait_for(
            lambda: not cluster.kubectl("get", "budgets", "-n", namespace, "-o", "name").strip(),
            DEADLINE,
            "the Budget to be let go",
        )

        def abandoned_events() -> list[dict[str, Any]]:
            listed = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json"))
            return [
                e
                for e in listed["items"]
                if e["reason"] == "CleanupAbandoned" and e["involvedObject"]["name"] == "stranded"
            ]

        # kopf posts Events in the background: the Budget can be gone before its Event is.
        abandoned = wait_for(abandoned_events, DEADLINE, "the CleanupAbandoned Event")
        assert len(abandoned) == 1
        assert abandoned[0]["type"] == "Warning"
        assert "def.stranded" in abandoned[0]["message"]
