"""The model client against a real scripted OpenAI-compatible server: requests, answers,
streams, and every failure classified into the loop's errors."""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import time
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.llm_client_support import provider
from troupe_devcluster.scripted_llm import (
    HttpError,
    Raw,
    ScriptedLlm,
    ScriptedToolCall,
    Text,
    ToolCalls,
)
from troupe_runtime.agent.llm.client import ModelTimeout, ProviderClient, retry_after
from troupe_runtime.agent.llm.types import (
    ChatRequest,
    Completion,
    ModelError,
    ModelRejected,
    ModelUnavailable,
    RateLimited,
    ToolSpec,
)

ASK = ChatRequest(messages=[{"role": "user", "content": "What is the capital of France?"}])
KEY_ENV = "TROUPE_PROVIDER_KEY_TEST"
KEY = "sk-test-0123456789abcdef"


def client_for(server: ScriptedLlm, **spec: Any) -> ProviderClient:
    return ProviderClient(
        provider("p", server.base_url, api_key_env=KEY_ENV, **spec), {KEY_ENV: KEY}
    )


class Deltas:
    """An ``on_delta`` sink that keeps what it got."""

    def __init__(self) -> None:
        self.got: list[str] = []

    async def __call__(self, text: str) -> None:
        self.got.append(text)


async def test_request_carries_model_messages_key_and_headers(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(Text("Paris"))
    client = client_for(scripted_llm, headers={"OpenAI-Organization": "org-1"})
    tool = ToolSpec("lookup", "Look a thing up", {"type": "object", "properties": {}})
    request = ChatRequest(
        messages=ASK.messages, tools=[tool], tool_choice="required", temperature=0.2, max_tokens=50
    )
    await client.complete(request, "m")
    await client.aclose()
    (sent,) = scripted_llm.completions
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["openai-organization"] == "org-1"
    assert sent.body == {
        "model": "m",
        "messages": ASK.messages,
        "tools": [tool.openai()],
        "tool_choice": "required",
        "temperature": 0.2,
        "max_tokens": 50,
    }


async def test_no_key_env_sends_no_authorization(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(Text("Paris"))
    client = ProviderClient(provider("p", scripted_llm.base_url), {})
    await client.complete(ChatRequest(messages=ASK.messages, tool_choice="auto"), "m")
    await client.aclose()
    (sent,) = scripted_llm.completions
    assert "authorization" not in sent.headers
    assert "tool_choice" not in sent.body  # OpenAI refuses a tool_choice without tools


async def test_a_key_with_a_trailing_newline_is_sent_without_it(scripted_llm: ScriptedLlm) -> None:
    # A Secret made with --from-file keeps the file's newline; the probe strips it too.
    scripted_llm.script(Text("Paris"))
    env = {KEY_ENV: f"  {KEY}\n"}
    client = ProviderClient(provider("p", scripted_llm.base_url, api_key_env=KEY_ENV), env)
    await client.complete(ASK, "m")
    await client.aclose()
    (sent,) = scripted_llm.completions
    assert sent.headers["authorization"] == f"Bearer {KEY}"


async def test_answer_with_usage_is_priced(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(Text("Paris", usage=(1_000_000, 500_000)))
    pricing = {"pricing": {"inputPerMillion": 2.0, "outputPerMillion": 8.0}}
    client = client_for(scripted_llm, model_fields=pricing)
    completion = await client.complete(ASK, "m")
    await client.aclose()
    assert completion.message == {"role": "assistant", "content": "Paris"}
    assert completion.finish_reason == "stop"
    assert (completion.provider, completion.model) == ("p", "m")
    assert completion.usage.tokens_in == 1_000_000
    assert completion.usage.tokens_out == 500_000
    assert completion.usage.cost_usd == pytest.approx(6.0)
    assert not completion.usage.estimated


async def test_usage_absent_is_estimated(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(Text("Paris is the capital.", usage=None))
    client = client_for(scripted_llm)
    completion = await client.complete(ASK, "m")
    await client.aclose()
    assert completion.usage.estimated
    assert completion.usage.tokens_in == 8  # 30 characters → ceil(30 / 4)
    assert completion.usage.tokens_out == 6  # 21 characters


@pytest.mark.parametrize("stream", [False, True])
async def test_malformed_tool_arguments_pass_through_raw(
    scripted_llm: ScriptedLlm, stream: bool
) -> None:
    broken = '{"city": "Par'
    scripted_llm.script(ToolCalls([ScriptedToolCall("weather", broken, id="c1")]))
    client = client_for(scripted_llm)
    completion = await client.complete(ASK, "m", Deltas() if stream else None)
    await client.aclose()
    assert completion.finish_reason == "tool_calls"
    (call,) = completion.tool_calls
    assert (call.id, call.name, call.arguments) == ("c1", "weather", broken)


async def test_stream_sends_deltas_in_order_and_assembles_the_message(
    scripted_llm: ScriptedLlm,
) -> None:
    scripted_llm.script(Text("The capital is Paris.", usage=(9, 5)))
    client = client_for(scripted_llm)
    deltas = Deltas()
    completion = await client.complete(ASK, "m", deltas)
    await client.aclose()
    assert deltas.got == ["The", " capital", " is", " Paris."]
    assert completion.message == {"role": "assistant", "content": "The capital is Paris."}
    assert (completion.usage.tokens_in, completion.usage.tokens_out) == (9, 5)
    (sent,) = scripted_llm.completions
    assert sent.body["stream"] is True
    assert sent.body["stream_options"] == {"include_usage": True}


async def test_stream_assembles_tool_calls_by_index(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(
        ToolCalls(
            [ScriptedToolCall("search", '{"q": "paris"}'), ScriptedToolCall("time", "{}")],
            argument_chunk=3,
        )
    )
    client = client_for(scripted_llm)
    completion = await client.complete(ASK, "m", Deltas())
    await client.aclose()
    assert [(c.id, c.name, c.arguments) for c in completion.tool_calls] == [
        ("call_0", "search", '{"q": "paris"}'),
        ("call_1", "time", "{}"),
    ]


async def test_stream_with_the_name_in_every_chunk_assembles_it_once(
    scripted_llm: ScriptedLlm,
) -> None:
    # llama.cpp's server repeats the whole function name in each chunk of a tool call.
    def chunk(arguments: str) -> str:
        call = {"index": 0, "id": "call_0", "function": {"name": "lookup", "arguments": arguments}}
        return "data: " + json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})

    events = [chunk('{"topic"'), chunk(': "nats"}'), "data: [DONE]"]
    body = "".join(f"{event}\n\n" for event in events).encode()
    scripted_llm.script(Raw(body, content_type="text/event-stream"))
    client = client_for(scripted_llm)
    completion = await client.complete(ASK, "m", Deltas())
    await client.aclose()
    assert [(c.name, c.arguments) for c in completion.tool_calls] == [
        ("lookup", '{"topic": "nats"}')
    ]


async def test_stream_answered_in_one_piece_is_one_delta(scripted_llm: ScriptedLlm) -> None:
    body = {"choices": [{"message": {"role": "assistant", "content": "Paris"}}]}
    scripted_llm.script(Raw(json.dumps(body).encode()))
    client = client_for(scripted_llm)
    deltas = Deltas()
    completion = await client.complete(ASK, "m", deltas)
    await client.aclose()
    assert deltas.got == ["Paris"]
    assert completion.message["content"] == "Paris"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({}, None),
    ],
)
async def test_429_is_rate_limited_with_retry_after(
    scripted_llm: ScriptedLlm, headers: dict[str, str], expected: float | None
) -> None:
    scripted_llm.script(HttpError(429, "Rate limit reached", headers=headers))
    client = client_for(scripted_llm)
    with pytest.raises(RateLimited, match="Rate limit reached") as caught:
        await client.complete(ASK, "m")
    await client.aclose()
    assert caught.value.retry_after == expected


async def test_429_retry_after_as_an_http_date(scripted_llm: ScriptedLlm) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    scripted_llm.script(HttpError(429, headers={"Retry-After": when}))
    client = client_for(scripted_llm)
    with pytest.raises(RateLimited) as caught:
        await client.complete(ASK, "m")
    await client.aclose()
    assert caught.value.retry_after is not None
    assert 27 <= caught.value.retry_after <= 30


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
async def test_server_errors_are_unavailable(scripted_llm: ScriptedLlm, status: int) -> None:
    scripted_llm.script(HttpError(status, "upstream overloaded"))
    client = client_for(scripted_llm)
    with pytest.raises(ModelUnavailable, match=f"HTTP {status}: upstream overloaded"):
        await client.complete(ASK, "m")
    await client.aclose()


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
async def test_client_errors_are_rejected_with_the_providers_message(
    scripted_llm: ScriptedLlm, status: int
) -> None:
    scripted_llm.script(HttpError(status, "you asked wrong"))
    client = client_for(scripted_llm)
    with pytest.raises(ModelRejected, match="you asked wrong") as caught:
        await client.complete(ASK, "m")
    await client.aclose()
    assert caught.value.status == status


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, "This model's maximum context length is 8192 tokens."),
        (500, "Requested tokens (3000) exceed context window of 2048"),
    ],
)
async def test_context_length_is_rejected_whatever_the_status(
    scripted_llm: ScriptedLlm, status: int, message: str
) -> None:
    scripted_llm.script(HttpError(status, message))
    client = client_for(scripted_llm)
    with pytest.raises(ModelRejected, match="context") as caught:
        await client.complete(ASK, "m")
    await client.aclose()
    assert caught.value.status == status


async def test_rejection_message_is_trimmed_and_leaks_no_key(scripted_llm: ScriptedLlm) -> None:
    said = f"Incorrect API key provided: {KEY}. See https://u:pw@docs.example/keys?token=abc\r\n"
    scripted_llm.script(HttpError(401, said + "x" * 5000))
    client = client_for(scripted_llm)
    with pytest.raises(ModelRejected) as caught:
        await client.complete(ASK, "m")
    await client.aclose()
    message = str(caught.value)
    assert KEY not in message
    assert "pw" not in message
    assert "abc" not in message
    assert "\r" not in message
    assert "\n" not in message
    assert len(message) < 600


async def test_missing_key_env_is_named_on_401(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(HttpError(401, "no key"))
    client = ProviderClient(provider("p", scripted_llm.base_url, api_key_env=KEY_ENV), {})
    with pytest.raises(ModelRejected, match=KEY_ENV):
        await client.complete(ASK, "m")
    await client.aclose()


@pytest.mark.parametrize(
    ("reply", "stream", "says"),
    [
        (Raw(b"<html>gateway</html>", content_type="text/html"), False, "not JSON"),
        (Raw(b'{"choices": []}'), False, "without choices"),
        (Raw(b'{"object": "chat.completion"}'), False, "without choices"),
        (Raw(b"[1, 2]"), False, "no completion"),
        (Raw(b'{"choices": [{"text": "legacy"}]}'), False, "no message"),
        (Raw(b'data: {"choices": []}\n\n', content_type="text/event-stream"), True, "[DONE]"),
        (Raw(b"data: {not json\n\n", content_type="text/event-stream"), True, "not JSON"),
        (
            Raw(
                b'data: {"error": {"message": "overloaded"}}\n\n', content_type="text/event-stream"
            ),
            True,
            "overloaded",
        ),
    ],
)
async def test_a_200_that_is_no_completion_is_unavailable(
    scripted_llm: ScriptedLlm, reply: Raw, stream: bool, says: str
) -> None:
    scripted_llm.script(reply)
    client = client_for(scripted_llm)
    with pytest.raises(ModelUnavailable) as caught:
        await client.complete(ASK, "m", Deltas() if stream else None)
    await client.aclose()
    assert says in str(caught.value)


@pytest.mark.parametrize("stream", [False, True])
async def test_response_larger_than_the_cap_is_unavailable(
    scripted_llm: ScriptedLlm, stream: bool
) -> None:
    scripted_llm.script(Text("word " * 20_000))
    client = ProviderClient(provider("p", scripted_llm.base_url), {}, max_response_bytes=10_000)
    with pytest.raises(ModelUnavailable, match="exceeds 10000 bytes"):
        await client.complete(ASK, "m", Deltas() if stream else None)
    await client.aclose()


async def test_no_answer_in_time_is_a_timeout(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(Text("late", delay=10))
    client = client_for(scripted_llm)
    started = time.monotonic()
    with pytest.raises(ModelTimeout, match=r"no answer within 0\.3s"):
        await client.complete(ASK, "m", time_limit=0.3)
    await client.aclose()
    assert time.monotonic() - started < 3


async def test_refused_connection_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ProviderClient(provider("p", f"http://127.0.0.1:{port}/v1"), {})
    with pytest.raises(ModelUnavailable, match="p/m"):
        await client.complete(ASK, "m")
    await client.aclose()


async def test_one_connection_serves_many_calls(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(*[Text(str(i)) for i in range(3)])
    client = client_for(scripted_llm)
    for _ in range(3):
        await client.complete(ASK, "m")
    await client.aclose()
    assert len({request.peer for request in scripted_llm.completions}) == 1


# Any bytes as the provider's answer: a Completion or one of the loop's errors, never a crash.

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
CHUNK = st.fixed_dictionaries(
    {
        "choices": st.lists(
            st.fixed_dictionaries({"delta": JSON, "finish_reason": JSON}), max_size=2
        )
    },
    optional={"usage": JSON, "error": JSON},
)


def _completion_like() -> st.SearchStrategy[bytes]:
    message = st.fixed_dictionaries(
        {}, optional={"content": JSON, "tool_calls": JSON, "role": JSON}
    )
    body = st.fixed_dictionaries(
        {"choices": st.lists(st.fixed_dictionaries({}, optional={"message": message}), max_size=2)},
        optional={"usage": JSON},
    )
    return st.one_of(body, JSON).map(lambda value: json.dumps(value).encode())


def _stream_like() -> st.SearchStrategy[bytes]:
    events = st.lists(st.one_of(CHUNK.map(json.dumps), st.text(max_size=30)), max_size=6)
    done = st.sampled_from(["data: [DONE]\n\n", ""])
    return st.tuples(events, done).map(
        lambda pair: ("".join(f"data: {event}\n\n" for event in pair[0]) + pair[1]).encode()
    )


def test_any_answer_is_a_completion_or_a_model_error() -> None:
    with ScriptedLlm() as server:

        @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(
            body=st.one_of(_completion_like(), _stream_like(), st.binary(max_size=200)),
            media=st.sampled_from(["application/json", "text/event-stream", "text/plain"]),
            stream=st.booleans(),
        )
        def answer(body: bytes, media: str, stream: bool) -> None:
            server.script(Raw(body, content_type=media))
            result = asyncio.run(_ask(server, stream))
            if isinstance(result, Completion):
                content = result.message["content"]
                assert result.message["role"] == "assistant"
                assert content is None or isinstance(content, str)
                assert all(isinstance(call.arguments, str) for call in result.tool_calls)
            else:
                assert isinstance(result, ModelUnavailable)

        answer()


async def _ask(server: ScriptedLlm, stream: bool) -> Completion | ModelError:
    client = ProviderClient(provider("p", server.base_url), {})
    try:
        return await client.complete(ASK, "m", Deltas() if stream else None, time_limit=10)
    except ModelError as error:
        return error
    finally:
        await client.aclose()


@given(st.dictionaries(st.sampled_from(["retry-after", "retry-after-ms"]), st.text(max_size=40)))
def test_retry_after_of_any_header_is_none_or_a_bounded_wait(headers: dict[str, str]) -> None:
    try:
        parsed = httpx.Headers(headers)
    except UnicodeEncodeError:
        return  # httpx refuses such a header before any server could send it
    wait = retry_after(parsed)
    assert wait is None or 0 <= wait <= 86_400


async def test_a_redirect_is_rejected_not_followed(scripted_llm: ScriptedLlm) -> None:
    moved = {"Location": "http://other.example/v1/chat/completions?token=abc"}
    scripted_llm.script(HttpError(307, headers=moved))
    client = client_for(scripted_llm)
    with pytest.raises(
        ModelRejected, match=r"redirected to http://other\.example/v1/chat/"
    ) as caught:
        await client.complete(ASK, "m")
    await client.aclose()
    assert "abc" not in str(caught.value)
    assert len(scripted_llm.requests) == 1


def test_any_split_of_a_streamed_answer_reassembles_it() -> None:
    with ScriptedLlm() as server:

        @settings(max_examples=60, deadline=None)
        @given(
            pieces=st.lists(st.text(min_size=1, max_size=12), max_size=8),
            arguments=st.text(max_size=60),
            step=st.integers(min_value=1, max_value=9),
        )
        def answer(pieces: list[str], arguments: str, step: int) -> None:
            call = ScriptedToolCall("f", arguments)
            server.script(
                Text("".join(pieces), chunks=pieces), ToolCalls([call], argument_chunk=step)
            )
            deltas = Deltas()

            async def both() -> tuple[Completion, Completion]:
                client = ProviderClient(provider("p", server.base_url), {})
                try:
                    text = await client.complete(ASK, "m", deltas)
                    return text, await client.complete(ASK, "m", Deltas())
                finally:
                    await client.aclose()

            text, tools = asyncio.run(both())
            assert deltas.got == pieces
            assert text.message["content"] == ("".join(pieces) or None)
            assert [c.arguments for c in tools.tool_calls] == [arguments]

        answer()
