"""The built-in handlers against local HTTP servers, and Python handlers by entrypoint."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.integration.runtime_harness import (
    eventually,
    make_config,
    output_stream,
    provisioned,
    running,
    sample,
    send,
    stored,
    stream_count,
)
from troupe_runtime.agent.context import Context
from troupe_runtime.agent.handlers import load_handler
from troupe_runtime.contract.dead_letters import ERROR_HEADER, REASON_HEADER
from troupe_runtime.contract.llm import API_KEY_ENV, BASE_URL_ENV, MODEL_ENV
from troupe_runtime.contract.policies import Handler

Recorded = list[tuple[str, dict[str, str], bytes]]


@contextmanager
def serving(answer: Any) -> Iterator[tuple[str, Recorded]]:
    """A local HTTP server that records each POST and answers it with ``answer(body)``."""
    requests: Recorded = []

    class Endpoint(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            reply = json.dumps(answer(json.loads(body))).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def chat_completion(request: dict[str, Any]) -> dict[str, Any]:
    """What an OpenAI-compatible server answers: the last user message, reversed."""
    content = request["messages"][-1]["content"]
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": request["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content[::-1]},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    }


async def test_http_posts_a_binary_cloudevent_and_publishes_the_response(
    nats_url: str,
) -> None:
    config = make_config(nats_url)
    with serving(lambda body: {"seen": body}) as (url, requests):
        handler = load_handler(Handler(type="http", url=f"{url}/events"))
        async with provisioned(config) as (_, js), running(config, handler.call):
            event = await send(js, config, {"q": 1})
            await eventually(lambda: stream_count(js, output_stream(config)), "the output")
            [output] = await stored(js, output_stream(config))
        await handler.close()

    [(path, headers, body)] = requests
    assert path == "/events"
    assert headers["ce-id"] == event.id
    assert headers["ce-type"] == "test.input"
    assert headers["ce-specversion"] == "1.0"
    assert body == b'{"q":1}'
    assert json.loads(output.data or b"") == {"seen": {"q": 1}}


async def test_llm_calls_chat_completions_and_publishes_the_answer(nats_url: str) -> None:
    config = make_config(nats_url)
    with serving(chat_completion) as (url, requests):
        env = {BASE_URL_ENV: f"{url}/v1", API_KEY_ENV: "sk-test", MODEL_ENV: "tiny-model"}
        handler = load_handler(Handler(type="llm"), env)
        async with provisioned(config) as (_, js), running(config, handler.call):
            await send(js, config, "hello")
            await eventually(lambda: stream_count(js, output_stream(config)), "the output")
            [output] = await stored(js, output_stream(config))
        await handler.close()

    [(path, headers, body)] = requests
    assert path == "/v1/chat/completions"
    assert headers["authorization"] == "Bearer sk-test"
    assert json.loads(body) == {
        "model": "tiny-model",
        "messages": [{"role": "user", "content": "hello"}],
    }
    assert json.loads(output.data or b"") == {
        "content": "olleh",
        "model": "tiny-model",
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    }


async def test_a_plain_python_function_runs_as_a_handler(nats_url: str) -> None:
    config = make_config(nats_url)
    handler = load_handler(
        Handler(type="python", entrypoint="tests.integration.runtime_harness:sync_upper")
    )
    async with provisioned(config) as (_, js), running(config, handler.call):
        await send(js, config, "quiet")
        await eventually(lambda: stream_count(js, output_stream(config)), "the output")
        [output] = await stored(js, output_stream(config))

    assert json.loads(output.data or b"") == {"upper": "QUIET"}


async def test_a_handler_raising_cancelled_error_fails_its_attempt_instead_of_requeueing(
    nats_url: str,
) -> None:
    config = make_config(nats_url, retry={"maxAttempts": 2, "backoff": ["50ms"]})
    attempts: list[int] = []

    async def cancels(ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise asyncio.CancelledError

    async with provisioned(config) as (_, js), running(config, cancels) as runtime:
        await send(js, config, "go")
        await eventually(lambda: stream_count(js, config.dead_letter_stream), "the dead letter")
        [letter] = await stored(js, config.dead_letter_stream)
        requeued = sample(runtime, "troupe_messages_total", outcome="requeued")
        retried = sample(runtime, "troupe_messages_total", outcome="retried")

    assert letter.headers is not None
    assert letter.headers[REASON_HEADER] == "exhausted"
    assert letter.headers[ERROR_HEADER].startswith("CancelledError (raised by the handler")
    assert attempts == [1, 2]
    assert (requeued, retried) == (0, 1)


async def test_a_handler_still_running_at_shutdown_is_requeued_not_failed(
    nats_url: str,
) -> None:
    config = make_config(nats_url)
    started = asyncio.Event()

    async def hangs(ctx: Context) -> None:
        started.set()
        await asyncio.Event().wait()

    async with provisioned(config) as (_, js):
        async with running(config, hangs, grace=0.2) as runtime:
            await send(js, config, "go")
            await eventually(started.is_set, "the handler to start")
        requeued = sample(runtime, "troupe_messages_total", outcome="requeued")
        retried = sample(runtime, "troupe_retries_total")

    assert (requeued, retried) == (1, 0)
