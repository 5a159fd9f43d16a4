"""The scripted OpenAI-compatible server answers what the script says, and records requests."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from troupe_devcluster.fixtures import wait_for
from troupe_devcluster.scripted_llm import (
    DEFAULT_USAGE,
    CountedUsage,
    HttpError,
    Raw,
    ScriptedLlm,
    ScriptedToolCall,
    Text,
    ToolCalls,
)

CHAT = [{"role": "user", "content": "hi"}]


def _post(
    server: ScriptedLlm, body: dict[str, Any], timeout: float = 10, **kwargs: Any
) -> httpx.Response:
    return httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=timeout, **kwargs)


def _events(server: ScriptedLlm, body: dict[str, Any]) -> list[str]:
    with httpx.stream(
        "POST", f"{server.base_url}/chat/completions", json=body, timeout=10
    ) as response:
        assert response.headers["content-type"] == "text/event-stream"
        return [
            line.removeprefix("data: ")
            for line in response.iter_lines()
            if line.startswith("data: ")
        ]


def test_base_url_is_loopback_and_ends_in_v1(scripted_llm: ScriptedLlm) -> None:
    assert scripted_llm.base_url.startswith("http://127.0.0.1:")
    assert scripted_llm.base_url.endswith("/v1")


def test_text_answer_with_usage(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(Text("hello there", usage=(3, 2)))
    body = _post(scripted_llm, {"model": "m", "messages": CHAT}).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello there"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert body["model"] == "m"


def test_usage_absent_when_scripted_so(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(Text("x", usage=None))
    assert "usage" not in _post(scripted_llm, {"model": "m", "messages": CHAT}).json()


def test_tool_call_arguments_are_sent_raw(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(ToolCalls([ScriptedToolCall("search", '{"q": "unclosed')]))
    message = _post(scripted_llm, {"model": "m", "messages": CHAT}).json()["choices"][0]["message"]
    assert message["tool_calls"] == [
        {
            "id": "call_0",
            "type": "function",
            "function": {"name": "search", "arguments": '{"q": "unclosed'},
        }
    ]


def test_http_error_with_headers(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(HttpError(429, "slow down", headers={"Retry-After": "7"}))
    response = _post(scripted_llm, {"model": "m", "messages": CHAT})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.json() == {"error": {"message": "slow down"}}


def test_raw_bytes_are_sent_as_given(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(Raw(b"\xff not json", content_type="text/plain"))
    response = _post(scripted_llm, {"model": "m", "messages": CHAT})
    assert response.content == b"\xff not json"


def test_replies_are_taken_in_order_and_model_queues_first(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(Text("first"), Text("second"))
    scripted_llm.script(Text("for b"), model="b")
    contents = [
        _post(scripted_llm, {"model": model, "messages": CHAT}).json()["choices"][0]["message"][
            "content"
        ]
        for model in ("a", "b", "b")
    ]
    assert contents == ["first", "for b", "second"]
    assert scripted_llm.pending == 0


def test_unscripted_call_fails_loudly(scripted_llm: ScriptedLlm) -> None:
    response = _post(scripted_llm, {"model": "m", "messages": CHAT})
    assert response.status_code == 500
    assert "nothing scripted" in response.json()["error"]["message"]


def test_stream_sends_content_deltas_then_done(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(Text("one two three"))
    events = _events(scripted_llm, {"model": "m", "messages": CHAT, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert "".join(d for d in deltas if d) == "one two three"
    assert [d for d in deltas if d] == ["one", " two", " three"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in chunk for chunk in chunks)


def test_stream_usage_in_a_last_chunk_when_asked(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(Text("hi", usage=(4, 1)))
    body = {
        "model": "m",
        "messages": CHAT,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    last = json.loads(_events(scripted_llm, body)[-2])
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == 4


def test_stream_tool_call_deltas_by_index(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(
        ToolCalls([ScriptedToolCall("a", '{"x": 1}'), ScriptedToolCall("b", "{}", id="id-b")])
    )
    events = _events(scripted_llm, {"model": "m", "messages": CHAT, "stream": True})
    arguments: dict[int, str] = {}
    names: dict[int, str] = {}
    for event in events[:-1]:
        for call in json.loads(event)["choices"][0]["delta"].get("tool_calls", []):
            function = call.get("function", {})
            names[call["index"]] = names.get(call["index"], "") + function.get("name", "")
            arguments[call["index"]] = arguments.get(call["index"], "") + function.get(
                "arguments", ""
            )
    assert names == {0: "a", 1: "b"}
    assert arguments == {0: '{"x": 1}', 1: "{}"}


def test_records_body_and_headers(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(Text("ok"))
    _post(scripted_llm, {"model": "m", "messages": CHAT}, headers={"Authorization": "Bearer k"})
    (request,) = scripted_llm.completions
    assert request.method == "POST"
    assert request.headers["authorization"] == "Bearer k"
    assert request.messages == CHAT


def test_models_lists_the_served_models(scripted_llm: ScriptedLlm) -> None:
    body = httpx.get(f"{scripted_llm.base_url}/models", timeout=10).json()
    assert [model["id"] for model in body["data"]] == ["scripted-model"]


@pytest.mark.parametrize("header", [None, "Bearer wrong"])
def test_key_check_answers_401(header: str | None) -> None:
    with ScriptedLlm(api_key="sekret") as server:
        headers = {"Authorization": header} if header else {}
        assert (
            httpx.get(f"{server.base_url}/models", headers=headers, timeout=10).status_code == 401
        )
        ok = httpx.get(f"{server.base_url}/models", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200


def test_delay_holds_the_response(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(Text("late", delay=5))
    with pytest.raises(httpx.ReadTimeout):
        _post(scripted_llm, {"model": "m", "messages": CHAT}, timeout=0.3)


def test_keep_alive_serves_many_requests_on_one_connection(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(*[Text(str(i)) for i in range(5)])
    with httpx.Client(timeout=10) as client:
        for i in range(5):
            body = {"model": "m", "messages": CHAT, "stream": i % 2 == 1}
            response = client.post(f"{scripted_llm.base_url}/chat/completions", json=body)
            assert response.status_code == 200


def _stream_usage(server: ScriptedLlm, body: dict[str, Any]) -> dict[str, int] | None:
    chunks = [json.loads(event) for event in _events(server, body)[:-1]]
    return next((chunk["usage"] for chunk in chunks if "usage" in chunk), None)


def test_served_records_each_completion_with_its_times_and_usage(
    scripted_llm: ScriptedLlm,
) -> None:
    scripted_llm.script(
        Text("a", usage=(5, 3)), Text("b", usage=(2, 1)), Text("c", usage=(4, 4)), HttpError(429)
    )
    before = time.time()
    _post(scripted_llm, {"model": "m", "messages": CHAT})
    streamed = {"model": "m", "messages": CHAT, "stream": True}
    _stream_usage(scripted_llm, {**streamed, "stream_options": {"include_usage": True}})
    assert _stream_usage(scripted_llm, streamed) is None
    _post(scripted_llm, {"model": "m", "messages": CHAT})
    httpx.get(f"{scripted_llm.base_url}/models", timeout=10)
    after = time.time()

    served = scripted_llm.served
    assert [(s.status, s.usage, s.reported) for s in served] == [
        (200, (5, 3), True),
        (200, (2, 1), True),
        (200, (4, 4), False),  # billed, though the stream did not say so
        (429, None, False),
    ]
    assert all(before <= s.received <= s.finished <= after for s in served)
    assert all(s.complete and s.model == "m" and s.body["messages"] == CHAT for s in served)
    assert [s.tokens for s in served] == [8, 3, 8, 0]
    assert scripted_llm.served_tokens(before, after + 1) == 19
    assert scripted_llm.served_tokens(served[1].finished, after + 1) == 11
    assert scripted_llm.served_tokens(after + 1, after + 2) == 0


def test_an_unscripted_request_is_served_as_a_500(scripted_llm: ScriptedLlm) -> None:
    _post(scripted_llm, {"model": "m", "messages": CHAT})
    [served] = scripted_llm.served
    assert (served.status, served.usage) == (500, None)


def test_the_default_reply_answers_whenever_nothing_is_queued(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.script(Text("queued"))
    scripted_llm.answer_by_default(Text("again"))
    contents = [
        _post(scripted_llm, {"model": "m", "messages": CHAT}).json()["choices"][0]["message"][
            "content"
        ]
        for _ in range(4)
    ]
    assert contents == ["queued", "again", "again", "again"]
    scripted_llm.answer_by_default(None)
    assert _post(scripted_llm, {"model": "m", "messages": CHAT}).status_code == 500


def test_counted_usage_counts_the_request_it_answers(scripted_llm: ScriptedLlm) -> None:
    scripted_llm.answer_by_default(Text("x", usage=CountedUsage(overhead=3)))
    messages = [
        {"role": "system", "content": "12345678"},  # 2 tokens
        {"role": "user", "content": [{"type": "text", "text": "123456789"}]},  # 3
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "ab", "arguments": "{}"}}
            ],
        },  # 1
        {"role": "tool", "tool_call_id": "c", "content": ""},  # at least 1
    ]
    body = {"model": "m", "messages": messages, "max_tokens": 40}
    usage = _post(scripted_llm, body).json()["usage"]
    assert usage == {"prompt_tokens": 7 + 4 * 3, "completion_tokens": 40, "total_tokens": 59}
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    assert _stream_usage(scripted_llm, streamed) == usage
    no_limit = _post(scripted_llm, {"model": "m", "messages": messages}).json()["usage"]
    assert no_limit["completion_tokens"] == DEFAULT_USAGE[1]
    assert [s.usage for s in scripted_llm.served] == [(19, 40), (19, 40), (19, DEFAULT_USAGE[1])]


TEXTS = st.text(max_size=40)
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"])},
        optional={
            "content": st.one_of(
                st.none(),
                TEXTS,
                st.lists(
                    st.fixed_dictionaries({"type": st.just("text"), "text": TEXTS}), max_size=3
                ),
            )
        },
    ),
    max_size=8,
)


@given(
    messages=MESSAGES,
    overhead=st.integers(0, 10),
    max_tokens=st.one_of(st.none(), st.integers(0, 10**6), st.booleans(), st.text(max_size=2)),
    completion=st.one_of(st.none(), st.integers(0, 100)),
)
def test_counted_usage_is_four_characters_a_token_per_message(
    messages: list[dict[str, Any]],
    overhead: int,
    max_tokens: Any,
    completion: int | None,
) -> None:
    body: dict[str, Any] = {"messages": messages}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens

    prompt, answer = CountedUsage(overhead, completion)(body)

    def chars(message: dict[str, Any]) -> int:
        content = message.get("content")
        if isinstance(content, list):
            return sum(len(part["text"]) for part in content)
        return len(content) if isinstance(content, str) else 0

    assert prompt == sum(max(1, math.ceil(chars(m) / 4)) + overhead for m in messages)
    valid_limit = type(max_tokens) is int
    expected = (
        completion if completion is not None else (max_tokens if valid_limit else DEFAULT_USAGE[1])
    )
    assert answer == expected


@given(body=st.one_of(st.none(), st.integers(), st.dictionaries(st.text(max_size=3), st.none())))
def test_counted_usage_of_a_body_that_is_no_chat_is_empty(body: Any) -> None:
    assert CountedUsage()(body) == (0, DEFAULT_USAGE[1])


def test_an_answer_cut_off_by_its_client_is_served_incomplete(scripted_llm: ScriptedLlm) -> None:
    """A client that dies mid-answer: the provider answered (and would bill) what it
    counted, but the caller never had it."""
    scripted_llm.script(Text("one two three four five six", usage=(9, 6), chunk_delay=0.2))
    body = {"model": "m", "messages": CHAT, "stream": True}
    with httpx.stream("POST", f"{scripted_llm.base_url}/chat/completions", json=body) as response:
        next(response.iter_lines())
    # The connection is closed; the server's next writes fail.
    served = wait_for(lambda: scripted_llm.served, 10, "the cut-off answer's record")
    assert [(s.status, s.usage, s.complete) for s in served] == [(200, (9, 6), False)]
