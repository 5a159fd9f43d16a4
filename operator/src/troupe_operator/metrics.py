"""Prometheus metrics of the operator: reconciles, errors and how long they take."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

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
_serving: set[int] = set()


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
