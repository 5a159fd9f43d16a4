"""Where the runtime may publish, how large a message may be, and when it is live (pure parts)."""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from troupe_runtime.agent.outputs import output_refusal, reply_refusal
from troupe_runtime.agent.settle import DeadLetter, Policy, Undelivered, decide
from troupe_runtime.contract import naming, wire
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.dead_letters import DeadLetterReason
from troupe_runtime.serving.health import Liveness

CONFIG = RuntimeConfig.model_validate(
    {"agent": "billing", "namespace": "shop", "contract": {"outputSubjects": ["out.shop.done"]}}
)
HEADER_NAME = st.from_regex(r"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,40}\Z")
HEADER_VALUE = st.text(max_size=200)
TOKEN = st.from_regex(r"\A[A-Za-z0-9_-]{1,12}\Z")


def encoded_by_nats_py(payload: bytes, headers: dict[str, str] | None) -> int:
    """The size nats-py itself announces in the HPUB (or PUB) line it would send."""
    client = Client()
    sent: list[bytes] = []

    async def capture(command: bytes, priority: bool = False) -> None:
        sent.append(command)

    client._send_command = capture  # type: ignore[method-assign,assignment]
    client._flush_queue = None
    asyncio.run(client._send_publish("s", "", payload, len(payload), headers))
    head = sent[0].split(b"\r\n", 1)[0].split()
    return int(head[-1])


# Sizes with headers: what the server compares with max_payload.


@given(
    payload=st.binary(max_size=300),
    headers=st.none() | st.dictionaries(HEADER_NAME, HEADER_VALUE, max_size=8),
)
def test_a_message_is_sized_exactly_as_nats_py_encodes_it(
    payload: bytes, headers: dict[str, str] | None
) -> None:
    assert wire.message_size(payload, headers) == encoded_by_nats_py(payload, headers)


def test_a_message_just_over_max_payload_only_with_its_headers_is_refused_naming_both_sizes() -> (
    None
):
    headers = {"ce-id": "x" * 100}
    payload = b"p" * (1000 - 10)
    reason = wire.oversize_reason("the output", "out.a", payload, headers, 1000)
    assert reason is not None
    size = wire.message_size(payload, headers)
    assert f"is {size} bytes with its headers (payload 990, headers {size - 990})" in reason
    assert "max_payload of 1000 bytes" in reason


@given(payload=st.binary(max_size=200), headers=st.dictionaries(HEADER_NAME, HEADER_VALUE))
def test_a_message_fits_exactly_when_its_size_is_at_most_max_payload(
    payload: bytes, headers: dict[str, str]
) -> None:
    size = wire.message_size(payload, headers)
    assert wire.oversize_reason("m", "s", payload, headers, size) is None
    assert wire.oversize_reason("m", "s", payload, headers, size - 1) is not None


# The reply allow-list.


@given(workflow=TOKEN, run=TOKEN)
def test_a_reply_to_any_workflow_engine_of_the_own_namespace_is_allowed(
    workflow: str, run: str
) -> None:
    replyto = naming.workflow_subject(CONFIG.namespace, workflow, "replies", run)
    assert reply_refusal(CONFIG, replyto) is None


@pytest.mark.parametrize(
    "replyto",
    [
        "$JS.API.STREAM.PURGE.ORDERS",
        "$SYS.REQ.SERVER.PING",
        "$KV.troupe_shop_cart.k",
        naming.workflow_subject("other", "checkout", "replies", "r1"),
        naming.inbox_subject("other", "billing", 0),
        naming.inbox_subject("shop", "billing", 0),
        naming.workflow_subject("shop", "checkout", "start", "r1"),
        naming.workflow_subject("shop", "checkout", "replies", "r1") + ".deeper",
        naming.workflow_subject("shop", "checkout", "replies", "*"),
        naming.workflow_subject("shop", "checkout", "replies", ">"),
        "troupe.shop.workflows.checkout.replies.r 1",
        "troupe.shop.workflows..replies.r1",
        "_INBOX.abc",
    ],
)
def test_a_reply_anywhere_else_is_refused_naming_the_allowed_subjects(replyto: str) -> None:
    reason = reply_refusal(CONFIG, replyto)
    assert reason is not None
    assert repr(replyto) in reason
    assert naming.workflow_replies_wildcard("shop") in reason


@given(subject=st.text(max_size=60))
def test_no_subject_outside_the_namespaces_workflow_replies_is_allowed(subject: str) -> None:
    shape = re.compile(r"troupe\.shop\.wf\.[^.*> \s]+\.replies\.[^.*>\s]+")
    allowed = reply_refusal(CONFIG, subject) is None
    assert not allowed or shape.fullmatch(subject)
    assert not (allowed and subject.startswith("$"))


def test_no_replyto_needs_no_reply() -> None:
    assert reply_refusal(CONFIG, None) is None


@given(tokens=st.lists(TOKEN, min_size=1, max_size=6), data=st.data())
def test_a_pattern_matches_the_subjects_nats_would_deliver_to_it(
    tokens: list[str], data: st.DataObject
) -> None:
    subject = ".".join(tokens)
    starred = [data.draw(st.sampled_from([token, "*"])) for token in tokens]
    assert naming.subject_matches(".".join(starred), subject)
    cut = data.draw(st.integers(min_value=0, max_value=len(tokens) - 1))
    assert naming.subject_matches(".".join([*tokens[:cut], ">"]), subject)
    assert not naming.subject_matches(".".join([*tokens, ">"]), subject)
    assert not naming.subject_matches(".".join([*tokens, "*"]), subject)


# Output subjects.


def test_an_undeclared_or_server_output_subject_is_refused() -> None:
    declared = CONFIG.model_copy(
        update={"contract": CONFIG.contract.model_copy(update={"output_subjects": ["$JS.API.X"]})}
    )
    assert output_refusal(CONFIG, "out.shop.done") is None
    assert "not in contract.outputSubjects" in (output_refusal(CONFIG, "out.shop.other") or "")
    assert "server subject" in (output_refusal(declared, "$JS.API.X") or "")


def test_an_undeliverable_output_is_dead_lettered_at_once_whatever_the_attempt() -> None:
    policy = Policy(max_attempts=5)
    assert decide(Undelivered("no stream stores subject 'x'"), policy) == DeadLetter(
        DeadLetterReason.UNDELIVERABLE, "no stream stores subject 'x'"
    )


# Liveness.


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@given(steps=st.lists(st.tuples(st.booleans(), st.floats(0, 30)), max_size=30))
def test_live_exactly_while_unable_for_at_most_the_bound(steps: list[tuple[bool, float]]) -> None:
    clock, able = Clock(), [True]
    liveness = Liveness(lambda: able[0], bound=10.0, clock=clock)
    unable_since: float | None = None
    for now_able, elapsed in steps:
        clock.now += elapsed
        able[0] = now_able
        if now_able:
            unable_since = None
        elif unable_since is None:
            unable_since = clock.now
        expected = unable_since is None or clock.now - unable_since <= 10.0
        assert liveness() is expected


def test_a_runtime_unable_past_the_bound_fails_liveness_and_recovers_when_able() -> None:
    clock, able = Clock(), [False]
    liveness = Liveness(lambda: able[0], bound=5.0, clock=clock)
    assert liveness()
    clock.now = 5.5
    assert not liveness()
    assert liveness.unable_for() == 5.5
    able[0] = True
    assert liveness()
