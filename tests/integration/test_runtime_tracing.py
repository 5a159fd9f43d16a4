"""Trace context crosses hops through the OpenTelemetry API: with an SDK configured,
each message is a consumer span, child of the sender's traceparent, and the outputs
carry that span onward."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.integration.runtime_harness import (
    eventually,
    make_config,
    output_stream,
    provisioned,
    running,
    send,
    stored,
    stream_count,
)
from troupe_runtime.agent.handlers.echo import echo

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def exported() -> Iterator[InMemorySpanExporter]:
    """An SDK for this process (OpenTelemetry allows one provider per process)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()


async def test_a_message_is_a_child_span_of_its_sender_and_outputs_carry_it_on(
    nats_url: str, exported: InMemorySpanExporter
) -> None:
    config = make_config(nats_url)
    async with provisioned(config) as (_, js), running(config, echo):
        event = await send(js, config, {"q": 1}, traceparent=f"00-{TRACE}-{PARENT_SPAN}-01")
        await eventually(lambda: stream_count(js, output_stream(config)), "the output")
        [output] = await stored(js, output_stream(config))

    [span] = [s for s in exported.get_finished_spans() if s.name == "agent process"]
    assert span.kind == trace.SpanKind.CONSUMER
    assert span.attributes is not None
    assert span.attributes["messaging.message.id"] == event.id
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == PARENT_SPAN
    assert format(span.context.trace_id, "032x") == TRACE
    own = format(span.context.span_id, "016x")
    assert output.headers is not None
    assert output.headers["ce-traceparent"] == f"00-{TRACE}-{own}-01"
