"""The ModelProvider probe against real HTTP servers on loopback: what it sends (the key as a
Bearer token, the provider's headers), how it classifies each answer, and that nothing it
reports carries the key or a body."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from troupe_operator.builders.model_provider import Probe
from troupe_operator.clients import models

KEY = "sk-probe-secret"
Answer = Callable[[BaseHTTPRequestHandler], None]


def _json(status: int, body: bytes, headers: dict[str, str] | None = None) -> Answer:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return answer


class Server:
    """A loopback HTTP server giving every GET one answer, recording the headers."""

    def __init__(self, answer: Answer) -> None:
        self.seen: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.seen.append({k.lower(): v for k, v in self.headers.items()})
                answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,))
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1/models"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@pytest.fixture
def serve() -> Iterator[Callable[[Answer], Server]]:
    started: list[Server] = []

    def start(answer: Answer) -> Server:
        started.append(Server(answer))
        return started[-1]

    yield start
    for server in started:
        server.close()


def probe(url: str, key: str | None = KEY, headers: dict[str, str] | None = None) -> Probe:
    return asyncio.run(models.probe(url, key, headers or {}))


def test_a_model_list_is_listed_with_the_key_and_headers_sent(
    serve: Callable[[Answer], Server],
) -> None:
    server = serve(_json(200, b'{"object": "list", "data": [{"id": "a"}, {"id": "b"}]}'))

    found = probe(server.url, headers={"OpenAI-Organization": "org-1"})

    assert found == Probe("listed", models=("a", "b"))
    (sent,) = server.seen
    assert sent["authorization"] == f"Bearer {KEY}"
    assert sent["openai-organization"] == "org-1"


def test_no_key_sends_no_authorization(serve: Callable[[Answer], Server]) -> None:
    server = serve(_json(200, b'{"data": []}'))
    assert probe(server.url, key=None).outcome == "listed"
    assert "authorization" not in server.seen[0]


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (401, "unauthorized"),
        (403, "unauthorized"),
        (500, "unreachable"),
        (503, "unreachable"),
        (429, "unreachable"),
        (404, "invalid"),
    ],
)
def test_each_status_is_classified(
    serve: Callable[[Answer], Server], status: int, outcome: str
) -> None:
    server = serve(_json(status, f'{{"error": {{"message": "bad key {KEY}"}}}}'.encode()))
    found = probe(server.url)
    assert found.outcome == outcome
    assert KEY not in found.detail
    assert "bad key" not in found.detail


def test_a_redirect_is_not_followed_with_the_key(serve: Callable[[Answer], Server]) -> None:
    elsewhere = serve(_json(200, b'{"data": []}'))
    server = serve(_json(307, b"", {"Location": elsewhere.url}))
    assert probe(server.url).outcome == "invalid"
    assert not elsewhere.seen


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"data": {}}', b'{"data": [{"id": 3}]}', b'{"models": []}'],
)
def test_what_is_no_model_list_is_invalid(serve: Callable[[Answer], Server], body: bytes) -> None:
    assert probe(serve(_json(200, body)).url).outcome == "invalid"


def test_an_endless_answer_is_cut_short(serve: Callable[[Answer], Server]) -> None:
    huge = b'{"data": [' + b'{"id": "x"},' * (models.MAX_BODY_BYTES // 10) + b'{"id": "y"}]}'
    assert probe(serve(_json(200, huge)).url) == Probe(
        "invalid", f"answered more than {models.MAX_BODY_BYTES} bytes"
    )


def test_a_refused_connection_is_unreachable() -> None:
    found = probe("http://127.0.0.1:1/v1/models")
    assert found.outcome == "unreachable"
    assert found.detail.startswith("ConnectError")


def test_a_silent_server_is_unreachable_within_the_timeout(
    serve: Callable[[Answer], Server],
) -> None:
    release = threading.Event()

    def silent(handler: BaseHTTPRequestHandler) -> None:
        release.wait(10)

    server = serve(silent)
    try:
        found = probe(server.url)
    finally:
        release.set()
    assert found == Probe("unreachable", f"no answer within {models.PROBE_TIMEOUT.read:.0f}s")
