"""The message boundary against a real nats-server and runtime: pathological input, the binding.

Each test sends what once got past the runtime and asserts what can be seen:
the dead letter and its reason (at the first attempt), no output where none
may go, the runtime still ready, and the next good message processed. The
property at the end throws arbitrary headers and payloads at a running
runtime: every one is processed or dead-lettered with a reason, and the
runtime stays ready.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.js import JetStreamContext

from tests.integration.runtime_harness import (
    eventually,
    http_get,
    inbox_empty,
    make_config,
    output_stream,
    provisioned,
    running,
    sample,
    send,
    stored,
    stream_count,
)
from troupe_devcluster.layout import free_port
from troupe_runtime.agent.context import Context
from troupe_runtime.agent.handlers.echo import echo
from troupe_runtime.agent.runtime import Runtime
from troupe_runtime.contract import pod
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.dead_letters import ATTEMPTS_HEADER, ERROR_HEADER, REASON_HEADER
from troupe_runtime.contract.envelope import valid_traceparent

TRACE = "0af7651916cd43dd8448eb211c80319c"
REPOSITORY = Path(__file__).resolve().parents[2]


def binary_headers(event_id: str, **extra: str) -> dict[str, str]:
    return {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": "/tests",
        "ce-type": "test.input",
        **extra,
    }


async def the_letter(js: JetStreamContext, config: RuntimeConfig) -> dict[str, str]:
    await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter")
    [letter] = await stored(js, config.dead_letter_stream)
    return dict(letter.headers or {})


async def ready_and_next_good_one_handled(
    js: JetStreamContext, config: RuntimeConfig, runtime: Runtime, handled: list[str]
) -> int:
    """The status of ``/readyz`` once a good message sent now has been handled."""
    await send(js, config, {"fine": True}, event_id="good")
    await eventually(lambda: "good" in handled, "the next good message to be handled")
    return (await http_get(runtime.health.port, "/readyz")).status_code


def recorder(handled: list[str]) -> Any:
    async def record(ctx: Context) -> Any:
        handled.append(ctx.event.id)
        return ctx.event.data

    return record


async def test_json_nested_thousands_deep_is_dead_lettered_at_once_as_malformed(
    nats_url: str,
) -> None:
    config = make_config(nats_url)
    handled: list[str] = []

    async with provisioned(config) as (_, js), running(config, recorder(handled)) as runtime:
        deep = b"[" * 50_000 + b"]" * 50_000
        await js.publish(config.inbox_subject(0), deep, headers=binary_headers("deep"))
        letter = await the_letter(js, config)
        readyz = await ready_and_next_good_one_handled(js, config, runtime, handled)

    assert letter[REASON_HEADER] == "malformed"
    assert letter[ATTEMPTS_HEADER] == "1"
    assert letter[ERROR_HEADER] == "data nests deeper than the limit of 64 levels"
    assert handled == ["good"]
    assert readyz == 200


async def test_a_huge_header_value_is_dead_lettered_at_once_with_its_name(nats_url: str) -> None:
    config = make_config(nats_url)
    handled: list[str] = []

    async with provisioned(config) as (_, js), running(config, recorder(handled)) as runtime:
        headers = binary_headers("huge", **{"ce-correlationid": "c" * 40_000})
        await js.publish(config.inbox_subject(0), b"1", headers=headers)
        letter = await the_letter(js, config)
        readyz = await ready_and_next_good_one_handled(js, config, runtime, handled)

    assert letter[REASON_HEADER] == "malformed"
    assert letter[ATTEMPTS_HEADER] == "1"
    assert letter[ERROR_HEADER].startswith("header ce-correlationid is 40000 bytes, over the limit")
    assert handled == ["good"]
    assert readyz == 200


async def test_data_together_with_data_base64_is_dead_lettered_as_malformed(
    nats_url: str,
) -> None:
    config = make_config(nats_url)
    handled: list[str] = []
    body = {
        "specversion": "1.0",
        "id": "both",
        "source": "/tests",
        "type": "test.input",
        "data": {"a": 1},
        "data_base64": base64.b64encode(b"b").decode(),
    }

    async with provisioned(config) as (_, js), running(config, recorder(handled)):
        await js.publish(
            config.inbox_subject(0),
            json.dumps(body).encode(),
            headers={"content-type": "application/cloudevents+json"},
        )
        letter = await the_letter(js, config)

    assert letter[REASON_HEADER] == "malformed"
    assert "both data and data_base64" in letter[ERROR_HEADER]
    assert handled == []


async def test_an_output_of_nan_is_dead_lettered_as_invalid_output_and_never_published(
    nats_url: str,
) -> None:
    config = make_config(nats_url)

    async def not_a_number(ctx: Context) -> Any:
        return {"score": float("nan")}

    async with provisioned(config) as (_, js), running(config, not_a_number):
        await send(js, config, {"q": 1})
        letter = await the_letter(js, config)
        await eventually(lambda: inbox_empty(js, config), "the input to be acknowledged")
        outputs = await stream_count(js, output_stream(config))

    assert letter[REASON_HEADER] == "invalid-output"
    assert letter[ATTEMPTS_HEADER] == "1"
    assert "nan, which JSON cannot carry" in letter[ERROR_HEADER]
    assert outputs == 0


async def test_text_from_a_cloudevents_sdk_is_echoed_back_as_text_with_its_type(
    nats_url: str,
) -> None:
    """What the Go SDK's NATS sender writes: ``ce-datacontenttype``, percent-encoded values."""
    config = make_config(nats_url)

    async with provisioned(config) as (_, js), running(config, echo):
        headers = binary_headers(
            "caf%C3%A9%201", **{"ce-datacontenttype": "text/plain", "ce-subject": "%E2%82%AC"}
        )
        await js.publish(config.inbox_subject(0), "hello, wörld".encode(), headers=headers)
        await eventually(lambda: stream_count(js, output_stream(config)), "the output")
        [output] = await stored(js, output_stream(config))
        letters = await stream_count(js, config.dead_letter_stream)

    out = output.headers or {}
    assert output.data == "hello, wörld".encode()
    assert (out["content-type"], out["ce-datacontenttype"]) == ("text/plain", "text/plain")
    assert out["ce-causationid"] == "caf%C3%A9%201"
    assert letters == 0


async def test_an_invalid_traceparent_is_dropped_and_the_output_starts_a_new_trace(
    nats_url: str,
) -> None:
    config = make_config(nats_url)

    async with provisioned(config) as (_, js), running(config, echo):
        for version, trace in (("ff", TRACE), ("00", "0" * 32)):
            traceparent = f"{version}-{trace}-b7ad6b7169203331-01"
            headers = binary_headers(version, **{"ce-traceparent": traceparent})
            await js.publish(config.inbox_subject(0), json.dumps(trace).encode(), headers=headers)
        await eventually(lambda: _at_least(stream_count(js, output_stream(config)), 2), "outputs")
        outputs = await stored(js, output_stream(config))

    traceparents = [(m.headers or {})["ce-traceparent"] for m in outputs]
    assert all(valid_traceparent(value) for value in traceparents)
    assert not any(TRACE in value or "0" * 32 in value for value in traceparents)


async def _at_least(count: Any, expected: int) -> bool:
    return bool(await count >= expected)


@contextmanager
def runtime_process(config: RuntimeConfig, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m troupe_runtime.agent`` as the container runs it; killed at the end."""
    config_file = workdir / "config.json"
    config_file.write_text(config.to_json())
    with (workdir / "runtime.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, *pod.AGENT_COMMAND[1:], "--config", str(config_file)],
            cwd=REPOSITORY,
            env={**os.environ, pod.POD_IP_ENV: "127.0.0.1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        process.kill()
        process.wait()


async def process_ready(config: RuntimeConfig) -> bool:
    try:
        return (await http_get(config.health_port, "/readyz")).status_code == 200
    except httpx.TransportError:
        return False


async def test_a_catastrophic_schema_pattern_never_blocks_the_runtime_process(
    nats_url: str, tmp_path: Path
) -> None:
    """Python's ``re`` would take 2^5000 steps here, holding the loop and the probes for good."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}}}
    config = make_config(nats_url, healthPort=free_port())
    contract = config.contract.model_copy(update={"input_schema": schema})
    config = config.model_copy(update={"contract": contract})

    async with provisioned(config) as (_, js):
        with runtime_process(config, tmp_path) as process:
            await eventually(lambda: process_ready(config), "the runtime to be ready")
            await send(js, config, {"s": "a" * 5000 + "!"}, event_id="evil")
            letter = await the_letter(js, config)
            healthz = await http_get(config.health_port, "/healthz")
            await send(js, config, {"s": "aaaa"}, event_id="good")
            await eventually(lambda: stream_count(js, output_stream(config)), "the good output")
            alive = process.poll() is None

    assert letter[REASON_HEADER] == "invalid-input"
    assert letter[ATTEMPTS_HEADER] == "1"
    assert healthz.status_code == 200
    assert alive


# -- random input at a running runtime ------------------------------------------------

ATTRIBUTE_HEADERS = [
    "ce-specversion",
    "ce-id",
    "ce-source",
    "ce-type",
    "ce-time",
    "ce-priority",
    "ce-traceparent",
    "ce-datacontenttype",
    "content-type",
    "ce-x",
]
# NATS header names are HTTP tokens (nats-py refuses others); values carry no CR or LF. Names
# starting "Nats" are the server's (deduplication, expectations): not the runtime's input.
header_names = st.one_of(
    st.sampled_from(ATTRIBUTE_HEADERS),
    st.from_regex(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,12}", fullmatch=True).filter(
        lambda name: not name.lower().startswith("nats")
    ),
)
header_values = st.one_of(
    st.sampled_from(["1.0", "application/json", "text/plain", "%", "%C3", "ff-00"]),
    # No surrogates: a lone one cannot be encoded, so the test's own publish would fail.
    st.text(alphabet=st.characters(blacklist_characters="\r\n", codec="utf-8"), max_size=30),
    st.text(alphabet='%0123456789abcdefABCDEF"\\', max_size=20),
)
payloads = st.one_of(
    st.binary(max_size=100),
    st.integers(0, 3000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.sampled_from([b"NaN", b"1e400", b'{"a": 1}', b'"text"', b""]),
)
messages = st.tuples(
    st.booleans(), st.dictionaries(header_names, header_values, max_size=5), payloads
)


@settings(
    max_examples=3,
    deadline=None,
    # Each example runs a runtime: report a failing batch as drawn, without shrinking it.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(batch=st.lists(messages, min_size=10, max_size=25))
def test_random_input_is_processed_or_dead_lettered_and_the_runtime_stays_ready(
    nats_url: str, batch: list[tuple[bool, dict[str, str], bytes]]
) -> None:
    asyncio.run(_throw_at_a_runtime(nats_url, batch))


async def _throw_at_a_runtime(
    nats_url: str, batch: list[tuple[bool, dict[str, str], bytes]]
) -> None:
    config = make_config(nats_url)
    async with provisioned(config) as (_, js), running(config, echo) as runtime:
        for binary, headers, payload in batch:
            base = binary_headers(uuid.uuid4().hex) if binary else {}
            await js.publish(config.inbox_subject(0), payload, headers={**base, **headers})

        def finished() -> float:
            return sample(runtime, "troupe_messages_total", outcome="succeeded") + sample(
                runtime, "troupe_messages_total", outcome="dead_lettered"
            )

        await eventually(lambda: finished() == len(batch), "every message to be finished")
        await eventually(lambda: inbox_empty(js, config), "every message to be acknowledged")
        letters = []
        if await stream_count(js, config.dead_letter_stream):
            letters = await stored(js, config.dead_letter_stream)
        readyz = await http_get(runtime.health.port, "/readyz")

    assert readyz.status_code == 200
    assert all((m.headers or {}).get(REASON_HEADER) for m in letters)
    assert all((m.headers or {}).get(ERROR_HEADER) for m in letters)
