"""What ``troupe call`` makes of the gateway's answer (``troupe_cli.gateway``): a task with
its exit code, or an error a person can act on, whatever the bytes; and no credential in
anything it prints."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from troupe_cli import render
from troupe_cli.errors import CliError, Refused
from troupe_cli.gateway import CallAnswer, CallRequest, answer, shown_url

REQUEST = CallRequest(
    gateway="http://gw:8080",
    namespace="team",
    kind="agent",
    name="echo",
    data={"text": "hi"},
    token="s3cret-token",
    task_id="t1",
)


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("state", "code"),
    [("completed", 0), ("failed", 1), ("canceled", 1), ("rejected", 1), ("working", 3)],
)
def test_a_task_exits_by_its_state(state: str, code: int) -> None:
    status = 202 if state == "working" else 200
    assert answer(REQUEST, status, body(taskId="t1", state=state)).exit_code == code


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (401, "--token or --api-key"),
        (403, "troupe-invoker"),
        (404, "kubectl get agents"),
        (409, "another target"),
        (400, "refused the call"),
    ],
)
def test_a_refusal_exits_2_and_says_what_to_do(status: int, words: str) -> None:
    with pytest.raises(Refused, match=words) as refused:
        answer(REQUEST, status, body(reason="because"))
    assert "because" in str(refused.value)
    assert refused.value.exit_code == 2


def test_a_server_error_exits_1() -> None:
    with pytest.raises(CliError) as failed:
        answer(REQUEST, 503, b"upstream gone")
    assert failed.value.exit_code == 1
    assert "upstream gone" in str(failed.value)


@given(st.integers(100, 599), st.binary(max_size=300))
def test_any_answer_is_a_task_or_a_cli_error(status: int, content: bytes) -> None:
    try:
        got = answer(REQUEST, status, content)
    except CliError as error:
        message = str(error)
    else:
        assert isinstance(got, CallAnswer)
        message = render.call_text(REQUEST, got)
    assert len(message) < 1500 or status in (200, 202)
    assert "s3cret-token" not in message


def test_a_completed_text_output_prints_as_is_and_a_still_working_task_says_how_to_wait() -> None:
    done = answer(REQUEST, 200, body(taskId="t1", state="completed", output="hello"))
    assert render.call_text(REQUEST, done) == "hello"
    going = answer(REQUEST, 202, body(taskId="t1", state="working"), "/v1/x/tasks/t1")
    text = render.call_text(REQUEST, going)
    assert "troupe call agent echo --id t1" in text
    assert "GET /v1/x/tasks/t1" in text


def test_the_token_goes_in_a_header_only() -> None:
    assert REQUEST.headers()["Authorization"] == "Bearer s3cret-token"
    assert REQUEST.headers()["Idempotency-Key"] == "t1"
    assert "s3cret" not in REQUEST.url


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "Echo"},
        {"name": "../x"},
        {"namespace": "a" * 64},
        {"gateway": "ftp://gw"},
        {"task_id": "a\r\nX-Evil: 1"},
        {"token": "a\nb"},
        {"api_key": "k"},
    ],
)
def test_a_bad_request_is_refused_before_anything_is_sent(fields: dict[str, str]) -> None:
    given_fields = {
        "gateway": "http://gw",
        "namespace": "team",
        "kind": "agent",
        "name": "echo",
        "data": None,
        "token": "t",
        "task_id": "t1",
        **fields,
    }
    with pytest.raises(Refused):
        CallRequest(**given_fields)  # type: ignore[arg-type]


def test_a_url_is_shown_without_its_user_info() -> None:
    assert shown_url("https://user:pw@gw.example:8443/base") == "https://gw.example:8443"
