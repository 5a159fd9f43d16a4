"""The runtime's chaos holder and injection points, without a server: what an entry makes
each point do, that an entry ends at its ``until``, and that no value of the key crashes."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from troupe_runtime.agent.chaos import DUPLICATE_HEADER, Chaos, InjectedFault, cut
from troupe_runtime.agent.llm.chaos import ChaoticToolBox, InjectedModelError, model_fault
from troupe_runtime.agent.llm.client import ModelTimeout
from troupe_runtime.agent.llm.types import ToolCall, ToolResult, ToolSpec
from troupe_runtime.contract.chaos import INJECTED_ERROR, AgentFaults, Faults
from troupe_runtime.serving.metrics import ChaosMetrics

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


class Sleeps:
    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


def entry(faults: dict[str, Any], until: datetime = NOW + timedelta(minutes=5)) -> bytes:
    value = AgentFaults(
        experiment="exp", run="r1", until=until, faults=Faults.model_validate(faults)
    )
    return value.model_dump_json(by_alias=True).encode()


def holder() -> tuple[Chaos, ChaosMetrics, Clock, Sleeps]:
    metrics = ChaosMetrics(CollectorRegistry())
    clock, sleeps = Clock(), Sleeps()
    chaos = Chaos("ns", "agent", metrics, rng=random.Random(7), clock=clock, sleep=sleeps)
    return chaos, metrics, clock, sleeps


def counted(metrics: ChaosMetrics, point: str, kind: str) -> float:
    labels = {"point": point, "kind": kind}
    return metrics.registry.get_sample_value("troupe_chaos_injected_total", labels) or 0.0


def test_nothing_is_armed_until_an_entry_arrives() -> None:
    chaos, *_ = holder()
    assert not chaos.armed
    assert chaos.roll("handler").harmless


async def test_a_handler_error_ratio_of_one_fails_every_call_with_the_injected_reason() -> None:
    chaos, metrics, _, _ = holder()
    chaos.update(entry({"handler": {"errorRatio": 1}}))
    for _ in range(3):
        with pytest.raises(InjectedFault, match=INJECTED_ERROR) as raised:
            await chaos.before_handler()
    assert "ChaosExperiment exp" in str(raised.value)
    assert counted(metrics, "handler", "error") == 3


async def test_handler_latency_is_waited_and_counted_without_an_error() -> None:
    chaos, metrics, _, sleeps = holder()
    chaos.update(entry({"handler": {"latency": "250ms"}}))
    await chaos.before_handler()
    assert sleeps.seconds == [0.25]
    assert counted(metrics, "handler", "latency") == 1
    assert counted(metrics, "handler", "error") == 0


def test_an_entry_ends_at_its_until_without_being_removed() -> None:
    chaos, _, clock, _ = holder()
    chaos.update(entry({"handler": {"errorRatio": 1}}, until=NOW + timedelta(seconds=10)))
    assert chaos.roll("handler").fail
    assert chaos.in_force()
    clock.now = NOW + timedelta(seconds=10)
    assert not chaos.in_force()
    assert chaos.roll("handler").harmless
    assert not chaos.armed  # forgotten at the first roll past it: one check per message again


def test_an_entry_already_ended_or_empty_arms_nothing() -> None:
    chaos, *_ = holder()
    chaos.update(entry({"handler": {"errorRatio": 1}}, until=NOW - timedelta(seconds=1)))
    assert not chaos.armed
    chaos.update(entry({}))
    assert not chaos.armed


def test_a_removed_entry_disarms() -> None:
    chaos, *_ = holder()
    chaos.update(entry({"handler": {"errorRatio": 1}}))
    chaos.update(None)
    assert not chaos.armed


def test_a_point_the_entry_does_not_name_is_calm() -> None:
    chaos, metrics, _, _ = holder()
    chaos.update(entry({"tools": {"errorRatio": 1}}))
    assert chaos.roll("handler").harmless
    assert chaos.roll("model").harmless
    assert counted(metrics, "handler", "error") == 0


def test_a_bad_entry_replaces_a_good_one_and_injects_nothing() -> None:
    chaos, *_ = holder()
    chaos.update(entry({"handler": {"errorRatio": 1}}))
    chaos.update(b'{"experiment": "exp", "faults": {"handler": {"errorRatio": 2}}}')
    assert not chaos.armed


@given(st.binary(max_size=512))
def test_no_value_of_the_key_crashes_the_holder(raw: bytes) -> None:
    chaos, *_ = holder()
    chaos.update(raw, 1)
    assert chaos.roll("handler") is not None


CALL_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "errorRatio": st.floats(allow_nan=False, allow_infinity=False),
        "latencyRatio": st.floats(allow_nan=False, allow_infinity=False),
        "latency": st.sampled_from(["0s", "10ms", "-1s", "11m", "soon", ""]),
        "dropEvery": st.sampled_from(["1s", "0s", "x"]),
        "duplicateRatio": st.floats(allow_nan=False, allow_infinity=False),
    },
)


@given(
    st.dictionaries(
        st.sampled_from(["handler", "model", "tools", "messages", "connection", "x"]),
        st.one_of(st.none(), st.integers(), st.text(max_size=5), CALL_FIELDS),
        max_size=4,
    )
)
def test_no_json_entry_crashes_the_holder(faults: dict[str, Any]) -> None:
    chaos, *_ = holder()
    raw = json.dumps(
        {"experiment": "e", "run": "r", "until": "2027-01-01T00:00:00Z", "faults": faults}
    )
    chaos.update(raw.encode(), 1)
    chaos.roll("handler")
    chaos.roll_message()


async def test_a_model_error_is_an_unavailable_model_with_the_injected_reason() -> None:
    chaos, metrics, _, _ = holder()
    chaos.update(entry({"model": {"errorRatio": 1}}))
    with pytest.raises(InjectedModelError, match=INJECTED_ERROR):
        await model_fault(chaos, "provider p, model m", 30.0)
    assert counted(metrics, "model", "error") == 1


async def test_model_latency_is_taken_from_the_call_time_limit() -> None:
    chaos, _, _, sleeps = holder()
    chaos.update(entry({"model": {"latency": "2s"}}))
    assert await model_fault(chaos, "p", 30.0) == 28.0
    assert sleeps.seconds == [2.0]


async def test_model_latency_past_the_time_limit_is_a_timeout() -> None:
    chaos, _, _, sleeps = holder()
    chaos.update(entry({"model": {"latency": "1m"}}))
    with pytest.raises(ModelTimeout, match=INJECTED_ERROR):
        await model_fault(chaos, "p", 5.0)
    assert sleeps.seconds == [5.0]


async def test_no_model_fault_costs_nothing_when_disarmed() -> None:
    chaos, _, _, sleeps = holder()
    assert await model_fault(chaos, "p", 30.0) == 30.0
    assert sleeps.seconds == []


class Tools:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def specs(self) -> list[ToolSpec]:
        return []

    async def call(self, call: ToolCall, arguments: dict[str, Any]) -> ToolResult:
        self.calls.append(call.name)
        return ToolResult("ran")

    async def aclose(self) -> None:
        return None


async def test_a_tool_error_is_an_error_result_and_the_tool_does_not_run() -> None:
    chaos, metrics, _, _ = holder()
    chaos.update(entry({"tools": {"errorRatio": 1}}))
    inner = Tools()
    result = await ChaoticToolBox(inner, chaos).call(ToolCall("c1", "lookup", "{}"), {})
    assert result.is_error
    assert INJECTED_ERROR in result.content
    assert inner.calls == []
    assert counted(metrics, "tools", "error") == 1


async def test_a_calm_tool_call_runs_the_tool() -> None:
    chaos, *_ = holder()
    inner = Tools()
    result = await ChaoticToolBox(inner, chaos).call(ToolCall("c1", "lookup", "{}"), {})
    assert result == ToolResult("ran")


def test_message_rolls_follow_the_ratios() -> None:
    chaos, *_ = holder()
    chaos.update(entry({"messages": {"duplicateRatio": 1, "delay": "1s"}}))
    roll = chaos.roll_message()
    assert roll.fail
    assert roll.delay == timedelta(seconds=1)


class Published:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, str]]] = []

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        self.sent.append((subject, payload, headers))


class Message:
    subject = "troupe.ns.agents.agent.in.0"
    data = b'{"n":1}'
    headers: ClassVar[dict[str, str]] = {
        "ce-id": "e1",
        "Nats-Msg-Id": "e1",
        "Nats-Expected-Stream": "X",
    }


async def test_a_duplicate_keeps_the_envelope_and_drops_the_dedupe_header() -> None:
    chaos, metrics, _, _ = holder()
    chaos.update(entry({"messages": {"duplicateRatio": 1}}))
    js = Published()
    await chaos.duplicate(js, Message())  # type: ignore[arg-type]
    [(subject, payload, headers)] = js.sent
    assert subject == Message.subject
    assert payload == Message.data
    assert headers == {"ce-id": "e1", DUPLICATE_HEADER: "exp"}
    assert counted(metrics, "messages", "duplicate") == 1


async def test_a_delay_reports_progress_while_it_waits() -> None:
    chaos, metrics, _, sleeps = holder()
    progress: list[bool] = []

    class Delayed:
        async def in_progress(self) -> None:
            progress.append(True)

    await chaos.delay_message(Delayed(), timedelta(seconds=10), 4.0)  # type: ignore[arg-type]
    assert sleeps.seconds == [4.0, 4.0, 2.0]
    assert len(progress) == 2
    assert counted(metrics, "messages", "delay") == 1


class Socket:
    def __init__(self) -> None:
        self.aborted = 0
        self.twice = asyncio.Event()

    def abort(self) -> None:
        self.aborted += 1
        if self.aborted >= 2:
            self.twice.set()


class FakeClient:
    """What ``cut`` reaches into: nats-py's transport, its writer and the socket."""

    is_connected = True

    def __init__(self) -> None:
        self.socket = Socket()
        writer = type("Writer", (), {"transport": self.socket})()
        self._transport = type("Transport", (), {"_io_writer": writer})()


def test_cut_aborts_the_socket_and_says_when_there_is_none() -> None:
    client = FakeClient()
    assert cut(client)  # type: ignore[arg-type]
    assert client.socket.aborted == 1
    assert not cut(object())  # type: ignore[arg-type]


async def test_connections_are_dropped_every_drop_every_while_in_force() -> None:
    metrics = ChaosMetrics(CollectorRegistry())
    chaos = Chaos("ns", "agent", metrics)
    until = datetime.now(UTC) + timedelta(minutes=5)
    chaos.update(entry({"connection": {"dropEvery": "100ms"}}, until=until))
    client = FakeClient()
    dropping = asyncio.create_task(chaos.drop_connections(client))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(10):
            await client.socket.twice.wait()
    finally:
        dropping.cancel()
        await asyncio.gather(dropping, return_exceptions=True)
    assert counted(metrics, "connection", "drop") >= 2
    assert dropping.cancelled()  # the session's teardown ends it
