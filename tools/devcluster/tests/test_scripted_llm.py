"""The scripted OpenAI-compatible server answers what the script says, and records requests."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from troupe_devcluster.scripted_llm import (
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
