"""Trace context across hops, through the OpenTelemetry API.

Each message is handled inside a consumer span whose parent is the event's W3C
``traceparent``; outputs and replies carry the context of that span onward.
With an OpenTelemetry SDK configured, these are real, exported spans; with the
API alone they are no-ops, and each hop still gets a span id of its own.

Only a valid W3C trace context is continued: the envelope drops an invalid
``traceparent`` on input (version ``ff``, an all-zero trace or parent id), so
such a message starts a new trace, and nothing invalid is ever sent onward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from troupe_runtime.contract.envelope import CloudEvent, child_traceparent, valid_traceparent

TRACEPARENT = "traceparent"
_propagator = TraceContextTextMapPropagator()
_tracer = trace.get_tracer("troupe_runtime")


@contextmanager
def handling(event: CloudEvent, agent: str) -> Iterator[None]:
    """A consumer span for handling ``event``, a child of the hop that sent it."""
    context = event.traceparent
    carrier = {TRACEPARENT: context} if context and valid_traceparent(context) else {}
    parent = _propagator.extract(carrier)
    attributes = {
        "messaging.system": "nats",
        "messaging.message.id": event.id,
        "troupe.agent": agent,
        "troupe.correlation_id": event.run_id,
    }
    with _tracer.start_as_current_span(
        f"{agent} process", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
    ):
        yield


def outgoing(parent: str | None) -> str:
    """The traceparent for a message sent now: the current span's, when one records."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    current = carrier.get(TRACEPARENT)
    if current is None or current == parent or not valid_traceparent(current):
        # No SDK: the span does not record, so mint this hop's own span id.
        return child_traceparent(parent)
    return current
