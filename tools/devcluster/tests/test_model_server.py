"""The local model server: it starts, answers like OpenAI, and fails loudly when it cannot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from troupe_devcluster.model_server import (
    CONTEXT_TOKENS,
    ModelServer,
    server_argv,
    smollm2_gguf,
    start_model_server,
)
from troupe_devcluster.processes import ComponentError

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def complete(server: ModelServer, **body: object) -> Any:
    """The server's JSON answer to one chat completion request."""
    response = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": server.model, "max_tokens": 24, "temperature": 0, **body},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_the_model_answers_a_chat_completion_with_usage(local_model: ModelServer) -> None:
    answer = complete(local_model, messages=[{"role": "user", "content": "Say hello."}])

    [choice] = answer["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    usage = answer["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0


def test_a_forced_tool_call_names_the_tool_with_json_arguments(local_model: ModelServer) -> None:
    answer = complete(
        local_model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64,
    )

    [choice] = answer["choices"]
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"]), dict)


def test_the_server_reports_the_model_it_serves(local_model: ModelServer) -> None:
    models = httpx.get(f"{local_model.base_url}/models", timeout=10).json()
    assert [model["id"] for model in models["data"]] == [local_model.model]


def test_the_model_ships_in_a_package_and_is_served_with_its_context() -> None:
    argv = server_argv(smollm2_gguf(), "127.0.0.1", 8000)
    assert argv[argv.index("--n_ctx") + 1] == str(CONTEXT_TOKENS)
    assert smollm2_gguf().stat().st_size > 50_000_000


def test_a_server_that_cannot_start_fails_with_its_log(tmp_path: Path) -> None:
    not_a_model = tmp_path / "broken.gguf"
    not_a_model.write_bytes(b"not a model")

    with pytest.raises(ComponentError) as raised:
        start_model_server(tmp_path / "server.log", model=not_a_model, deadline=60)

    message = str(raised.value)
    assert "the model server exited with status" in message
    assert "broken.gguf" in message  # the log's tail names what it could not load
