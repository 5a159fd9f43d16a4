"""One ModelProvider's HTTP client: an OpenAI chat completion, streamed or not, classified.

Every byte from the provider is hostile input: the body is read to at most
``MAX_RESPONSE_BYTES``, JSON of any shape is accepted without a crash, and the answer is
rebuilt from the fields Troupe uses (content, tool calls, finish reason, usage) rather
than passed on. Failures end in exactly one of the errors of ``types.py``, so the router
and the loop decide on the class, never on a status code:

- 429 → ``RateLimited`` (``retry-after-ms``, else ``Retry-After`` in seconds or a date);
- 5xx, 408, a refused connection, a 200 that is no completion → ``ModelUnavailable``;
  a timeout → ``ModelTimeout`` (a ``ModelUnavailable``);
- other 4xx, a redirect, a context-length error whatever its status → ``ModelRejected``
  with the provider's message, trimmed and redacted (URLs, and the key itself).

One ``httpx.AsyncClient`` per provider keeps its connections alive between calls.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx
from httpx_sse import EventSource, SSEError

from troupe_runtime.agent.llm.tokens import completion_usage
from troupe_runtime.agent.llm.types import (
    ChatRequest,
    Completion,
    DeltaSink,
    Message,
    ModelRejected,
    ModelUnavailable,
    RateLimited,
    content_text,
)
from troupe_runtime.contract.llm import ResolvedProvider
from troupe_runtime.contract.redact import HIDDEN, redact

MAX_RESPONSE_BYTES = 8 * 1024 * 1024
"""A completion body or a whole stream; far above any real answer, far below harm."""
MAX_TOOL_CALLS = 128
"""Tool calls one answer may ask for (streamed indexes beyond are refused)."""
MAX_ERROR_CHARS = 500
MAX_ERROR_BODY_BYTES = 64 * 1024
"""Of an error response, only the start is read: the message is at most 500 characters."""
MAX_RETRY_AFTER_SECONDS = 86_400.0
CONNECT_TIMEOUT_SECONDS = 10.0
DEFAULT_CALL_TIMEOUT_SECONDS = 120.0

CONTEXT_LENGTH = re.compile(
    r"context[ _-]?(length|window)|maximum context|too many tokens|prompt is too long|"
    r"exceeds? (the )?(model'?s? )?(max(imum)? )?context",
    re.IGNORECASE,
)
"""How providers say a request does not fit: OpenAI, vLLM, llama.cpp, Anthropic's gateway."""
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")


class ModelTimeout(ModelUnavailable):
    """The model did not answer within the call's timeout."""


class _TooLarge(Exception):
    pass


class _BoundedStream(httpx.AsyncByteStream):
    """A response body that stops at ``limit`` bytes: raw, before any decoding."""

    def __init__(self, inner: httpx.AsyncByteStream, limit: int) -> None:
        self._inner = inner
        self._left = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._left -= len(chunk)
            if self._left < 0:
                raise _TooLarge
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class ProviderClient:
    """Chat completions from one provider; ``complete`` raises only the errors of types.py."""

    def __init__(
        self,
        provider: ResolvedProvider,
        env: Mapping[str, str],
        *,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.name = provider.name
        self._spec = provider.spec
        self._max_bytes = max_response_bytes
        self._url = provider.spec.base_url.rstrip("/") + "/chat/completions"
        # Stripped as the operator's probe strips it: a Secret made from a file ends in a newline.
        key = env.get(provider.api_key_env, "").strip() if provider.api_key_env else ""
        self._key = key or None
        self._missing_key = provider.api_key_env if provider.api_key_env and not self._key else None
        headers = {**provider.spec.headers, "Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(DEFAULT_CALL_TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS),
            # A redirect would carry the key to wherever it points; it is refused instead.
            follow_redirects=False,
            # HTTPS_PROXY, NO_PROXY and SSL_CERT_FILE from the Agent's env apply: a hosted
            # provider behind an egress proxy works as for any HTTP client.
            trust_env=True,
        )

    def body(self, request: ChatRequest, model: str, stream: bool) -> dict[str, Any]:
        """The OpenAI request body of ``request`` for ``model``."""
        body: dict[str, Any] = {"model": model, "messages": request.messages}
        if request.tools:
            body["tools"] = [tool.openai() for tool in request.tools]
            # OpenAI refuses a tool_choice without tools.
            if request.tool_choice is not None:
                body["tool_choice"] = request.tool_choice
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.response_format is not None:
            body["response_format"] = request.response_format
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def complete(
        self,
        request: ChatRequest,
        model: str,
        on_delta: DeltaSink | None = None,
        time_limit: float = DEFAULT_CALL_TIMEOUT_SECONDS,
    ) -> Completion:
        """Ask ``model``; stream when ``on_delta`` is given (it gets each content delta)."""
        content = json.dumps(self.body(request, model, on_delta is not None)).encode()
        try:
            async with asyncio.timeout(time_limit):
                message, finish, usage = await self._call(content, on_delta)
        except TimeoutError:
            raise ModelTimeout(f"{self._where(model)}: no answer within {time_limit:g}s") from None
        except httpx.TimeoutException as error:
            raise ModelTimeout(f"{self._where(model)}: {type(error).__name__}") from None
        except httpx.HTTPError as error:
            reason = self._clean(str(error)) or type(error).__name__
            raise ModelUnavailable(f"{self._where(model)}: {reason}") from None
        except _TooLarge:
            raise ModelUnavailable(
                f"{self._where(model)}: the response exceeds {self._max_bytes} bytes"
            ) from None
        except _NotACompletion as error:
            raise ModelUnavailable(f"{self._where(model)}: {self._clean(str(error))}") from None
        except _Failed as error:
            raise error.classify(self._where(model), self._clean) from None
        served = self._spec.model(model)
        pricing = served.pricing if served is not None else None
        usage = completion_usage(usage, request.messages, message, pricing)
        return Completion(message, finish, usage, self.name, model)

    async def aclose(self) -> None:
        await self._http.aclose()

    def _where(self, model: str) -> str:
        return f"{self.name}/{model}"

    async def _call(
        self, content: bytes, on_delta: DeltaSink | None
    ) -> tuple[Message, str | None, Any]:
        headers = {"Accept": "text/event-stream"} if on_delta is not None else None
        async with self._http.stream("POST", self._url, content=content, headers=headers) as reply:
            reply.stream = _BoundedStream(reply.stream, self._max_bytes)  # type: ignore[arg-type]
            if reply.status_code != 200:
                raise _Failed(
                    reply, await _read_some(reply, MAX_ERROR_BODY_BYTES), self._missing_key
                )
            media = reply.headers.get("content-type", "").partition(";")[0].strip().lower()
            if on_delta is not None and media == "text/event-stream":
                return await _assemble(EventSource(reply), on_delta)
            answer = _parse_completion(await reply.aread())
        # Asked to stream, answered in one piece: still one delta for the listener.
        if on_delta is not None and answer[0]["content"]:
            await on_delta(answer[0]["content"])
        return answer

    def _clean(self, text: str) -> str:
        """A provider's text made safe to show: one line, trimmed, no URL secrets, no key."""
        text = _UNPRINTABLE.sub(" ", text).strip()
        if self._key:
            text = text.replace(self._key, HIDDEN)
        text = redact(text[: MAX_ERROR_CHARS * 2])
        if self._key:
            text = text.replace(self._key, HIDDEN)
        return text[:MAX_ERROR_CHARS]


class _NotACompletion(Exception):
    """A 200 whose body is not a chat completion; the message says what was wrong."""


class _Failed(Exception):
    """A non-200 response, read (bounded) and waiting to be classified."""

    def __init__(self, reply: httpx.Response, body: bytes, missing_key: str | None) -> None:
        self.status = reply.status_code
        self.headers = reply.headers
        self.body = body
        self.missing_key = missing_key

    def classify(self, where: str, clean: Callable[[str], str]) -> Exception:
        status = self.status
        said = clean(error_message(self.body)) or f"HTTP {status}"
        message = f"{where}: HTTP {status}: {said}"
        if status == 429:
            return RateLimited(message, retry_after(self.headers))
        if CONTEXT_LENGTH.search(said):
            return ModelRejected(message, status)
        if status >= 500 or status in (408, 409, 425):
            return ModelUnavailable(message)
        if 300 <= status < 400:
            location = clean(self.headers.get("location", "")) or "elsewhere"
            return ModelRejected(
                f"{where}: HTTP {status}: redirected to {location}; set the provider's baseUrl "
                "to the final address",
                status,
            )
        if status == 401 and self.missing_key:
            message += f" (the API key's env variable {self.missing_key} is not set)"
        if 400 <= status < 500:
            return ModelRejected(message, status)
        return ModelUnavailable(message)


def error_message(body: bytes) -> str:
    """What the provider said: OpenAI's ``error.message``, a ``detail`` or the raw text."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return body[: MAX_ERROR_CHARS * 4].decode("utf-8", "replace")
    for candidate in (payload, payload.get("error") if isinstance(payload, dict) else None):
        if isinstance(candidate, str):
            return candidate
        if isinstance(candidate, dict):
            for key in ("message", "detail", "error"):
                if isinstance(candidate.get(key), str):
                    return str(candidate[key])
    return body[: MAX_ERROR_CHARS * 4].decode("utf-8", "replace")


def retry_after(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    millis = _seconds(headers.get("retry-after-ms"))
    if millis is not None:
        return min(millis / 1000.0, MAX_RETRY_AFTER_SECONDS)
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is None:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = max(0.0, when.timestamp() - (time.time() if now is None else now))
    return min(seconds, MAX_RETRY_AFTER_SECONDS)


def _seconds(value: str | None) -> float | None:
    if value is None or len(value) > 32:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _parse_completion(body: bytes) -> tuple[Message, str | None, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise _NotACompletion(f"a 200 that is not JSON ({_preview(body)})") from None
    if not isinstance(payload, dict):
        raise _NotACompletion(f"a 200 that is no completion: JSON {type(payload).__name__}")
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _NotACompletion("a 200 without choices")
    choice = choices[0]
    raw = choice.get("message")
    if not isinstance(raw, dict):
        raise _NotACompletion("a 200 whose first choice has no message")
    message: Message = {"role": "assistant", "content": content_text(raw.get("content"))}
    calls = raw.get("tool_calls")
    if isinstance(calls, list) and calls:
        if len(calls) > MAX_TOOL_CALLS:
            raise _NotACompletion(f"{len(calls)} tool calls (at most {MAX_TOOL_CALLS})")
        message["tool_calls"] = [
            _tool_call(call, index) for index, call in enumerate(calls) if isinstance(call, dict)
        ]
    finish = choice.get("finish_reason")
    return message, finish if isinstance(finish, str) else None, payload.get("usage")


def _tool_call(call: dict[str, Any], index: int) -> dict[str, Any]:
    function = call.get("function")
    function = function if isinstance(function, dict) else {}
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        # Some servers send an object; the loop parses text, so give it text.
        arguments = "" if arguments is None else json.dumps(arguments)
    name = function.get("name")
    call_id = call.get("id")
    return {
        "id": call_id if isinstance(call_id, str) and call_id else f"call_{index}",
        "type": "function",
        "function": {"name": name if isinstance(name, str) else "", "arguments": arguments},
    }


class _Call:
    """A tool call being assembled from stream deltas."""

    __slots__ = ("arguments", "id", "name")

    def __init__(self) -> None:
        self.id = ""
        self.name: list[str] = []
        self.arguments: list[str] = []


async def _assemble(source: EventSource, on_delta: DeltaSink) -> tuple[Message, str | None, Any]:
    """The final message of an SSE stream, sending each content delta on as it arrives."""
    content: list[str] = []
    calls: dict[int, _Call] = {}
    finish: str | None = None
    usage: Any = None
    try:
        async for event in source.aiter_sse():
            data = event.data
            if data == "[DONE]":
                break
            if not data:
                continue
            try:
                chunk = json.loads(data)
            except (ValueError, RecursionError):
                raise _NotACompletion(
                    f"a stream event that is not JSON ({_preview(data)})"
                ) from None
            if not isinstance(chunk, dict):
                raise _NotACompletion("a stream event that is not a JSON object")
            if "error" in chunk:
                said = error_message(data.encode())
                raise _NotACompletion(f"the stream broke off with an error: {said}")
            if isinstance(chunk.get("usage"), dict):
                usage = chunk["usage"]
            choices = chunk.get("choices")
            choice = choices[0] if isinstance(choices, list) and choices else None
            if not isinstance(choice, dict):
                continue
            if isinstance(choice.get("finish_reason"), str):
                finish = choice["finish_reason"]
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            text = delta.get("content")
            if isinstance(text, str) and text:
                content.append(text)
                await on_delta(text)
            deltas = delta.get("tool_calls")
            for call in deltas if isinstance(deltas, list) else ():
                _add_call_delta(calls, call)
        else:
            raise _NotACompletion("the stream ended without [DONE]")
    except SSEError as error:
        raise _NotACompletion(str(error)) from None
    message: Message = {"role": "assistant", "content": "".join(content) if content else None}
    if calls:
        message["tool_calls"] = [
            {
                "id": call.id or f"call_{position}",
                "type": "function",
                "function": {"name": "".join(call.name), "arguments": "".join(call.arguments)},
            }
            for position, (_, call) in enumerate(sorted(calls.items()))
        ]
    return message, finish, usage


def _add_call_delta(calls: dict[int, _Call], delta: Any) -> None:
    if not isinstance(delta, dict):
        raise _NotACompletion("a tool call delta that is not an object")
    index = delta.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise _NotACompletion(f"a tool call delta with index {_preview(str(index))}")
    call = calls.get(index)
    if call is None:
        if len(calls) >= MAX_TOOL_CALLS:
            raise _NotACompletion(f"more than {MAX_TOOL_CALLS} tool calls")
        call = calls[index] = _Call()
    if isinstance(delta.get("id"), str) and delta["id"]:
        call.id = delta["id"]
    function = delta.get("function")
    if isinstance(function, dict):
        name = function.get("name")
        if isinstance(name, str) and name:
            # OpenAI sends the name once; llama.cpp repeats it whole in every chunk. A chunk
            # that starts with what is assembled so far is the name again, not a further part.
            so_far = "".join(call.name)
            if so_far and name.startswith(so_far):
                call.name[:] = [name]
            else:
                call.name.append(name)
        if isinstance(function.get("arguments"), str):
            call.arguments.append(function["arguments"])


async def _read_some(reply: httpx.Response, limit: int) -> bytes:
    """The first ``limit`` bytes of the body (the rest is dropped with the connection)."""
    body = bytearray()
    async for chunk in reply.aiter_bytes():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


def _preview(data: bytes | str) -> str:
    text = data if isinstance(data, str) else data[:200].decode("utf-8", "replace")
    return _UNPRINTABLE.sub(" ", text[:60]).strip() or "empty"
