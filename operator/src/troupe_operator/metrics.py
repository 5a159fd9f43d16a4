"""Prometheus metrics of the operator: reconciles, errors and how long they take, and each
Budget's spending as its last pass read it, and each ChaosExperiment's run figures."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter(
    "troupe_operator_reconciles_total", "Reconcile passes, by kind and result.", ["kind", "result"]
)
ERRORS = Counter(
    "troupe_operator_errors_total",
    "Failed reconcile passes, by kind and exception.",
    ["kind", "reason"],
)
DURATION = Histogram(
    "troupe_operator_reconcile_duration_seconds", "Time of one reconcile pass.", ["kind"]
)
LEADER = Gauge(
    "troupe_operator_leader",
    "1 while this replica holds the operator's Lease and reconciles, 0 while it stands by.",
)
BUDGET_SPENT = Gauge(
    "troupe_budget_spent",
    "Spent in a Budget's current window (Run windows: summed over its runs), by unit.",
    ["namespace", "budget", "unit"],
)
BUDGET_REMAINING = Gauge(
    "troupe_budget_remaining",
    "What a Budget's hard limit leaves (hard - spent - reserved), by unit with a hard limit.",
    ["namespace", "budget", "unit"],
)
BUDGET_LIMIT_EXCEEDED = Gauge(
    "troupe_budget_limit_exceeded",
    "1 while a Budget's current window is at or past its soft or hard limit, else 0.",
    ["namespace", "budget", "level"],
)
CHAOS_PROBES = Gauge(
    "troupe_chaos_probes",
    "A ChaosExperiment's probes in its current (or last) run, by outcome: sent, answered, "
    "failed, pending, lost.",
    ["namespace", "experiment", "outcome"],
)
CHAOS_FIGURES = Gauge(
    "troupe_chaos_run",
    "A ChaosExperiment's current (or last) run: success_ratio, p95_latency_seconds, "
    "dead_letters_growth, pods_killed, running (1 while faults are in force), verdict "
    "(1 Passed, 0 Failed, -1 Aborted, unset before any).",
    ["namespace", "experiment", "figure"],
)
_CHAOS_OUTCOMES = ("sent", "answered", "failed", "pending", "lost")
_CHAOS_FIGURES = (
    "success_ratio",
    "p95_latency_seconds",
    "dead_letters_growth",
    "pods_killed",
    "running",
    "verdict",
)
_BUDGET_UNITS = ("tokens", "costUsd")
_BUDGET_LEVELS = ("soft", "hard")
_serving: set[int] = set()


def set_budget(namespace: str, budget: str, values: dict[str, dict[str, float]]) -> None:
    """A Budget's gauges from ``values`` (``spent`` and ``remaining`` by unit, ``exceeded`` by
    level); a unit without a hard limit has no remaining series."""
    for unit in _BUDGET_UNITS:
        BUDGET_SPENT.labels(namespace, budget, unit).set(values["spent"].get(unit, 0.0))
        if unit in values["remaining"]:
            BUDGET_REMAINING.labels(namespace, budget, unit).set(values["remaining"][unit])
        else:
            _forget(BUDGET_REMAINING, namespace, budget, unit)
    for level in _BUDGET_LEVELS:
        BUDGET_LIMIT_EXCEEDED.labels(namespace, budget, level).set(values["exceeded"][level])


def forget_budget(namespace: str, budget: str) -> None:
    """A deleted Budget's series go: a gauge left behind would report a budget forever."""
    for unit in _BUDGET_UNITS:
        _forget(BUDGET_SPENT, namespace, budget, unit)
        _forget(BUDGET_REMAINING, namespace, budget, unit)
    for level in _BUDGET_LEVELS:
        _forget(BUDGET_LIMIT_EXCEEDED, namespace, budget, level)


def set_chaos(
    namespace: str, experiment: str, probes: dict[str, int], figures: dict[str, float | None]
) -> None:
    """A ChaosExperiment's gauges; a figure None (not measured) has no series."""
    for outcome in _CHAOS_OUTCOMES:
        CHAOS_PROBES.labels(namespace, experiment, outcome).set(probes.get(outcome, 0))
    for figure in _CHAOS_FIGURES:
        value = figures.get(figure)
        if value is None:
            _forget(CHAOS_FIGURES, namespace, experiment, figure)
        else:
            CHAOS_FIGURES.labels(namespace, experiment, figure).set(value)


def forget_chaos(namespace: str, experiment: str) -> None:
    """A deleted ChaosExperiment's series go."""
    for outcome in _CHAOS_OUTCOMES:
        _forget(CHAOS_PROBES, namespace, experiment, outcome)
    for figure in _CHAOS_FIGURES:
        _forget(CHAOS_FIGURES, namespace, experiment, figure)


def _forget(gauge: Gauge, *labels: str) -> None:
    with suppress(KeyError):
        gauge.remove(*labels)


@contextmanager
def reconcile_timer(kind: str) -> Iterator[None]:
    """Count and time one reconcile pass of ``kind``; an exception counts as an error."""
    started = time.perf_counter()
    try:
        yield
    except Exception as error:
        RECONCILES.labels(kind, "error").inc()
        ERRORS.labels(kind, type(error).__name__).inc()
        raise
    else:
        RECONCILES.labels(kind, "ok").inc()
    finally:
        DURATION.labels(kind).observe(time.perf_counter() - started)


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Serve /metrics on ``port`` in a background thread (0 turns metrics off); a second call
    is a no-op, so a standby can serve them before it leads and starts the handlers."""
    if port and port not in _serving:
        start_http_server(port, addr=address)
        _serving.add(port)
