"""A scripted OpenAI-compatible server: the deterministic model behind the LLM tests.

A real HTTP server on 127.0.0.1 (a free port, a background thread) that answers
``POST /v1/chat/completions`` (JSON, or SSE with ``stream: true``) and ``GET /v1/models``
from a script: a queue of replies, each a text answer, a tool-call answer (raw argument
text, so malformed JSON can be scripted), an HTTP error, or raw bytes. Every request is
recorded, body and headers, so a test asserts on what the client really sent, and every
completion it answered is recorded with its times and the exact usage it reported
(``served``), so a test measures tokens per minute or sums what a budget should have
counted. ``usage`` may be computed from the request (``CountedUsage``: a prompt count and
the request's ``max_tokens``), and ``answer_by_default`` answers any number of requests.

A real local model answers too slowly and too loosely for 429s, malformed tool calls or a
missing ``usage``; this server answers exactly what the test says.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_MODEL = "scripted-model"
DEFAULT_USAGE = (11, 7)
"""(prompt_tokens, completion_tokens) a reply reports unless told otherwise."""
MAX_REQUEST_BYTES = 16 * 1024 * 1024
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class CountedUsage:
    """Usage counted from the request, as a provider counts it, instead of fixed numbers.

    prompt_tokens: ``ceil(characters / 4)`` of each message's text (at least 1 a message,
    Troupe's own estimate) plus ``overhead`` a message (a chat template's tokens);
    completion_tokens: ``completion`` if set, else the request's ``max_tokens`` (a model
    that used all it was allowed), else ``DEFAULT_USAGE``'s."""

    overhead: int = 0
    completion: int | None = None

    def __call__(self, request: Any) -> tuple[int, int]:
        body = request if isinstance(request, dict) else {}
        messages = body.get("messages")
        prompt = sum(
            max(1, -(-_message_chars(m) // CHARS_PER_TOKEN)) + self.overhead
            for m in (messages if isinstance(messages, list) else [])
        )
        asked = body.get("max_tokens")
        if self.completion is not None:
            completion = self.completion
        elif isinstance(asked, int) and not isinstance(asked, bool) and asked >= 0:
            completion = asked
        else:
            completion = DEFAULT_USAGE[1]
        return prompt, completion


Usage = tuple[int, int] | Callable[[Any], tuple[int, int]] | None
"""Fixed ``(prompt_tokens, completion_tokens)``, a function of the request's JSON body
(``CountedUsage``), or None for no usage at all."""


@dataclass(frozen=True)
class ScriptedToolCall:
    """One tool call in an answer; ``arguments`` is sent as is, valid JSON or not."""

    name: str
    arguments: str = "{}"
    id: str | None = None


@dataclass(frozen=True)
class Text:
    """An assistant answer with ``content``; streamed in ``chunks`` (default: word by word).

    ``usage`` is (prompt_tokens, completion_tokens), or None to send no usage at all;
    streamed, it goes in a last chunk only when the request asked with
    ``stream_options.include_usage``, as OpenAI does.
    """

    content: str
    usage: Usage = DEFAULT_USAGE
    finish_reason: str = "stop"
    chunks: Sequence[str] | None = None
    delay: float = 0.0
    """Seconds before the response starts (a slow or hung model)."""
    chunk_delay: float = 0.0
    """Seconds between streamed chunks."""


@dataclass(frozen=True)
class ToolCalls:
    """An assistant answer asking for tools; streamed as tool_call deltas by index."""

    calls: Sequence[ScriptedToolCall]
    content: str | None = None
    usage: Usage = DEFAULT_USAGE
    finish_reason: str = "tool_calls"
    argument_chunk: int = 4
    """Characters of the arguments per streamed delta."""
    delay: float = 0.0
    chunk_delay: float = 0.0


@dataclass(frozen=True)
class HttpError:
    """An error response: ``status``, a JSON ``body`` (OpenAI's error shape by default)."""

    status: int
    message: str = "scripted error"
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    """Sent as JSON instead of ``{"error": {"message": ...}}`` when set."""
    delay: float = 0.0


@dataclass(frozen=True)
class Raw:
    """Bytes sent exactly as given: a hostile or broken provider."""

    body: bytes
    status: int = 200
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Reply = Text | ToolCalls | HttpError | Raw


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received; ``headers`` with lower-case names."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    """The parsed JSON body, or None when it was not JSON."""
    peer: tuple[str, int] = ("", 0)
    """The client's address and port: one port for many requests means one connection."""

    @property
    def messages(self) -> list[dict[str, Any]]:
        body = self.body if isinstance(self.body, dict) else {}
        messages = body.get("messages")
        return messages if isinstance(messages, list) else []


@dataclass(frozen=True)
class Served:
    """One chat completion request the server answered (or failed), with its usage."""

    received: float
    """Epoch seconds the request came in."""
    finished: float
    """Epoch seconds the whole response had been written (the last chunk, streamed)."""
    model: str | None
    status: int
    """The response's status, sent or being sent when it was cut off."""
    usage: tuple[int, int] | None
    """(prompt_tokens, completion_tokens) of an answer (Text or ToolCalls): what a provider
    bills, reported or not; None for an error or a Raw reply."""
    reported: bool = True
    """Whether the response carried ``usage`` (a stream does only when asked to)."""
    complete: bool = True
    """False when the response was cut off (the client went away, the server closed)."""
    body: Any = None
    """The request's parsed JSON body (what was asked)."""

    @property
    def tokens(self) -> int:
        return sum(self.usage) if self.usage is not None else 0


class ScriptedLlm:
    """The server: ``script(...)`` queues replies, ``requests`` lists what came in.

    Replies are taken in order; a reply queued for a model (``script(..., model=M)``) is
    taken first by requests for that model. With nothing queued it answers the default
    reply (``answer_by_default``), else 500, naming the request, so an unscripted call
    fails loudly. ``served`` lists what each completion request was answered.
    """

    def __init__(self, models: Sequence[str] = (DEFAULT_MODEL,), api_key: str | None = None):
        self.models = list(models)
        self.api_key = api_key
        """When set, requests without ``Authorization: Bearer <api_key>`` get a 401."""
        self._lock = threading.Lock()
        self._queue: deque[Reply] = deque()
        self._by_model: dict[str, deque[Reply]] = {}
        self._requests: list[RecordedRequest] = []
        self._served: list[Served] = []
        self._default: Reply | None = None
        self._closing = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _handler_class(self))
        self._httpd.daemon_threads = True
        # A short poll so close() returns at once (shutdown waits for the next poll).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="scripted-llm", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """What a ModelProvider's ``baseUrl`` would be: ``http://127.0.0.1:<port>/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply, model: str | None = None) -> ScriptedLlm:
        """Queue ``replies``, for any model or only for requests naming ``model``."""
        with self._lock:
            queue = self._queue if model is None else self._by_model.setdefault(model, deque())
            queue.extend(replies)
        return self

    def answer_by_default(self, reply: Reply | None) -> ScriptedLlm:
        """Answer ``reply`` whenever nothing is queued (None: back to a loud 500)."""
        with self._lock:
            self._default = reply
        return self

    @property
    def served(self) -> list[Served]:
        """Every completion request answered so far, in the order they finished (a copy)."""
        with self._lock:
            return list(self._served)

    def served_tokens(self, since: float, until: float) -> int:
        """Tokens (prompt plus completion) of the completions finished in [since, until)."""
        return sum(s.tokens for s in self.served if since <= s.finished < until)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def completions(self) -> list[RecordedRequest]:
        """The chat completion requests so far."""
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    @property
    def pending(self) -> int:
        """Replies scripted and not yet taken."""
        with self._lock:
            return len(self._queue) + sum(len(q) for q in self._by_model.values())

    def close(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ScriptedLlm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Called from the server's threads.

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _next(self, model: str | None) -> Reply | None:
        with self._lock:
            queue = self._by_model.get(model) if model is not None else None
            if queue:
                return queue.popleft()
            return self._queue.popleft() if self._queue else self._default

    def _served_one(self, served: Served) -> None:
        with self._lock:
            self._served.append(served)

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``; False when the server is closing meanwhile."""
        return seconds <= 0 or not self._closing.wait(seconds)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (a timeout, a size cap) is a test's point, not an error."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_class(server: ScriptedLlm) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        scripted = server

    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle, a delayed ACK would add 40 ms.
    disable_nagle_algorithm = True
    scripted: ScriptedLlm

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read ``requests``, not a log."""

    def do_GET(self) -> None:
        self._receive(b"")
        if not self._authorised():
            return
        if self.path.rstrip("/").endswith("/models"):
            models = [
                {"id": m, "object": "model", "owned_by": "scripted"} for m in self.scripted.models
            ]
            self._json(200, {"object": "list", "data": models})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(min(length, MAX_REQUEST_BYTES))
        received = time.time()
        body = self._receive(raw)
        if not self._authorised():
            return
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._json(404, {"error": {"message": f"no route {self.path}"}})
            return
        request = body if isinstance(body, dict) else {}
        model = request.get("model") if isinstance(request.get("model"), str) else None
        reply = self.scripted._next(model)
        usage = None
        if isinstance(reply, Text | ToolCalls):
            usage = _resolved(reply.usage, request)
        reported, complete = False, False
        try:
            reported = self._answer(reply, usage, request, model)
            complete = True
        finally:
            served = Served(
                received, time.time(), model, _status(reply), usage, reported, complete, body
            )
            self.scripted._served_one(served)

    def _answer(
        self,
        reply: Reply | None,
        usage: tuple[int, int] | None,
        request: dict[str, Any],
        model: str | None,
    ) -> bool:
        """Send ``reply``; whether it reported ``usage``."""
        if reply is None:
            self._json(500, {"error": {"message": f"scripted_llm: nothing scripted for {model}"}})
            return False
        if not self.scripted._pause(reply.delay):
            raise ConnectionAbortedError("the server is closing")
        if isinstance(reply, HttpError):
            payload = (
                reply.body if reply.body is not None else {"error": {"message": reply.message}}
            )
            self._json(reply.status, payload, reply.headers)
            return False
        if isinstance(reply, Raw):
            self._send(reply.status, reply.body, reply.content_type, reply.headers)
            return False
        if request.get("stream") is True:
            options = request.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            self._stream(reply, usage, model or DEFAULT_MODEL, include_usage)
            return include_usage and usage is not None
        self._json(200, _completion(reply, usage, model or DEFAULT_MODEL))
        return usage is not None

    def _receive(self, raw: bytes) -> Any:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {name.lower(): value for name, value in self.headers.items()}
        peer = (str(self.client_address[0]), int(self.client_address[1]))
        self.scripted._record(RecordedRequest(self.command, self.path, headers, body, peer))
        return body

    def _authorised(self) -> bool:
        key = self.scripted.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._json(
            401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}
        )
        return False

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers or {})

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _stream(
        self,
        reply: Text | ToolCalls,
        usage: tuple[int, int] | None,
        model: str,
        include_usage: bool,
    ) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunks = list(_chunks(reply, usage, model, include_usage))
        for index, chunk in enumerate(chunks):
            if index and not self.scripted._pause(reply.chunk_delay):
                raise ConnectionAbortedError("the server is closing")
            self._write_chunk(f"data: {json.dumps(chunk)}\n\n".encode())
        self._write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _message_chars(message: Any) -> int:
    """The characters of a message's text: content (a string or text parts) and tool calls."""
    if not isinstance(message, dict):
        return 0
    content = message.get("content")
    chars = 0
    if isinstance(content, str):
        chars = len(content)
    elif isinstance(content, list):
        chars = sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            chars += sum(
                len(value)
                for value in (function.get("name"), function.get("arguments"))
                if isinstance(value, str)
            )
    return chars


def _status(reply: Reply | None) -> int:
    """The status ``reply`` is answered with (500: nothing was scripted)."""
    if isinstance(reply, HttpError | Raw):
        return reply.status
    return 200 if reply is not None else 500


def _resolved(usage: Usage, request: dict[str, Any]) -> tuple[int, int] | None:
    return usage(request) if callable(usage) else usage


def _usage(usage: tuple[int, int]) -> dict[str, int]:
    return {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}


def _tool_call_id(call: ScriptedToolCall, index: int) -> str:
    return call.id or f"call_{index}"


def _completion(
    reply: Text | ToolCalls, usage: tuple[int, int] | None, model: str
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if isinstance(reply, ToolCalls):
        message["tool_calls"] = [
            {
                "id": _tool_call_id(call, index),
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for index, call in enumerate(reply.calls)
        ]
    body: dict[str, Any] = {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
    }
    if usage is not None:
        body["usage"] = _usage(usage)
    return body


def _chunks(
    reply: Text | ToolCalls, usage: tuple[int, int] | None, model: str, include_usage: bool
) -> Iterator[dict[str, Any]]:
    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-scripted",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    yield chunk({"role": "assistant", "content": ""})
    if isinstance(reply, Text):
        pieces = reply.chunks if reply.chunks is not None else _words(reply.content)
        for piece in pieces:
            yield chunk({"content": piece})
    else:
        if reply.content:
            yield chunk({"content": reply.content})
        for index, call in enumerate(reply.calls):
            head = {"index": index, "id": _tool_call_id(call, index), "type": "function"}
            yield chunk(
                {"tool_calls": [{**head, "function": {"name": call.name, "arguments": ""}}]}
            )
            step = max(1, reply.argument_chunk)
            for start in range(0, len(call.arguments), step):
                piece = call.arguments[start : start + step]
                yield chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    yield chunk({}, reply.finish_reason)
    if include_usage and usage is not None:
        yield {
            "id": "chatcmpl-scripted",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [],
            "usage": _usage(usage),
        }


def _words(text: str) -> list[str]:
    """``"a b c"`` → ``["a", " b", " c"]``: pieces that join back to the text."""
    words = text.split(" ")
    return [words[0], *(" " + word for word in words[1:])] if text else []
