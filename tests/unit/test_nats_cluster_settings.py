"""A NATS URL lists every server of a cluster, and replicas reach every stream and bucket."""

from __future__ import annotations

import json
import re
from typing import Any

import nats.errors
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig, StreamConfig
from troupe_gateway.settings import Settings as GatewaySettings
from troupe_gateway.settings import SettingsError

from troupe_operator.api.agent import NatsConnection
from troupe_operator.builders import pods
from troupe_operator.clients import nats as clients_nats
from troupe_operator.clients.nats import MessagingUnavailable, NatsPool, NatsTarget
from troupe_operator.settings import from_environment
from troupe_runtime.contract.agent_config import NatsSettings
from troupe_runtime.contract.nats_servers import (
    NATS_URLS_PATTERN,
    InvalidNatsUrl,
    server_urls,
)
from troupe_runtime.nats.connection import connect_options
from troupe_runtime.nats.replicas import ReplicatedJetStream

CLUSTER = "nats://a:4222,nats://b:4222,nats://c:4222"

hosts = st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True)
servers = st.lists(
    st.builds(
        lambda scheme, host, port: f"{scheme}://{host}:{port}",
        st.sampled_from(["nats", "tls"]),
        hosts,
        st.integers(1, 65535),
    ),
    min_size=1,
    max_size=5,
)


def test_a_single_url_is_one_server() -> None:
    assert server_urls("nats://nats:4222") == ["nats://nats:4222"]


def test_a_comma_separated_url_is_every_server_in_order() -> None:
    assert server_urls(CLUSTER) == ["nats://a:4222", "nats://b:4222", "nats://c:4222"]


@pytest.mark.parametrize(
    "url",
    [
        "",
        "nats://a:4222,",
        ",nats://a:4222",
        "nats://a,,nats://b",
        "a:4222",
        "http://a:80",
        "nats://a:4222,ws://b:80",
        "nats://a b:4222",
    ],
)
def test_what_is_not_a_list_of_server_urls_is_refused(url: str) -> None:
    with pytest.raises(InvalidNatsUrl):
        server_urls(url)


@given(servers, st.sampled_from([",", ", ", " ,"]))
def test_joined_servers_parse_back_to_themselves(given_servers: list[str], comma: str) -> None:
    assert server_urls(comma.join(given_servers)) == given_servers


@given(servers)
def test_the_api_pattern_accepts_exactly_what_the_parser_accepts_without_blanks(
    given_servers: list[str],
) -> None:
    url = ",".join(given_servers)
    assert re.fullmatch(NATS_URLS_PATTERN, url)
    assert NatsConnection(url=url).url == url


_pieces = st.sampled_from(["nats://", "tls://", "ws://", "http://", "a", ":4222", ",", "", "$"])


@given(st.lists(_pieces, max_size=8).map("".join) | st.text(max_size=30))
def test_without_blanks_the_api_pattern_and_the_parser_agree(text: str) -> None:
    assume(not any(c.isspace() for c in text))
    matches = re.fullmatch(NATS_URLS_PATTERN, text) is not None
    try:
        parsed = server_urls(text)
    except InvalidNatsUrl:
        # The pattern lets websocket and plain servers mix; nats-py (and the parser) do not.
        assert not matches or len({part.startswith("ws") for part in text.split(",")}) > 1
    else:
        assert matches
        assert parsed == text.split(",")


def test_the_runtime_is_given_every_server() -> None:
    options = connect_options(NatsSettings(url=CLUSTER), "agent")
    assert options["servers"] == ["nats://a:4222", "nats://b:4222", "nats://c:4222"]


def test_the_operator_and_gateway_accept_a_server_list_and_refuse_a_broken_one() -> None:
    assert from_environment({"TROUPE_NATS_URL": CLUSTER}).nats_url == CLUSTER
    assert GatewaySettings.from_env({"TROUPE_NATS_URL": CLUSTER}).nats_url == CLUSTER
    with pytest.raises(ValueError, match="TROUPE_NATS_URL"):
        from_environment({"TROUPE_NATS_URL": "nats://a:4222,,"})
    with pytest.raises(SettingsError, match="TROUPE_NATS_URL"):
        GatewaySettings.from_env({"TROUPE_NATS_URL": "nats://a:4222,http://b"})


def test_replicas_come_from_the_operator_unless_the_spec_names_them() -> None:
    assert from_environment({}).nats_replicas == 1
    assert from_environment({"TROUPE_NATS_REPLICAS": "3"}).nats_replicas == 3
    for bad in ("0", "6", "three"):
        with pytest.raises(ValueError, match="TROUPE_NATS_REPLICAS"):
            from_environment({"TROUPE_NATS_REPLICAS": bad})
    assert GatewaySettings.from_env({"TROUPE_NATS_REPLICAS": "3"}).nats_replicas == 3
    with pytest.raises(SettingsError, match="TROUPE_NATS_REPLICAS"):
        GatewaySettings.from_env({"TROUPE_NATS_REPLICAS": "9"})
    assert pods.nats_settings(NatsConnection(), "nats://n", 3).replicas == 3
    assert pods.nats_settings(NatsConnection(replicas=1), "nats://n", 3).replicas == 1


def test_spec_replicas_are_bounded_by_jetstream() -> None:
    NatsConnection.model_validate({"replicas": 5})
    for bad in (0, 6):
        with pytest.raises(ValueError, match="replicas"):
            NatsConnection.model_validate({"replicas": bad})


class Recording(ReplicatedJetStream):
    """Records the configs it would send instead of sending them."""

    sent: list[StreamConfig]

    async def _api_request(
        self,
        req_subject: str,
        req: bytes = b"",
        timeout: float = 5,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        self.sent.append(StreamConfig.from_response(json.loads(req)))
        return {
            "config": json.loads(req),
            "created": "2026-01-01T00:00:00Z",
            "state": {
                "messages": 0,
                "bytes": 0,
                "first_seq": 0,
                "last_seq": 0,
                "consumer_count": 0,
            },
        }


async def test_every_stream_and_bucket_a_context_creates_gets_its_replicas() -> None:
    js = Recording(Client(), 3)
    js.sent = []
    await js.add_stream(StreamConfig(name="S", subjects=["s"]))
    await js.update_stream(StreamConfig(name="S", subjects=["s"], num_replicas=1))
    await js.add_stream(StreamConfig(name="T", subjects=["t"], num_replicas=5))
    await js.create_key_value(KeyValueConfig(bucket="B"))
    await js.create_object_store("O", ObjectStoreConfig())
    assert [c.num_replicas for c in js.sent] == [3, 3, 5, 3, 3]
    assert [c.name for c in js.sent[3:]] == ["KV_B", "OBJ_O"]


class Flaky(NatsPool):
    """A pool whose connection is a stand-in: the actions below never touch it."""

    async def jetstream(self, target: NatsTarget) -> JetStreamContext:
        return JetStreamContext(Client())


def _failing(*errors: Exception) -> tuple[list[int], Any]:
    calls: list[int] = []

    async def action(_: JetStreamContext) -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "done"

    return calls, action


async def test_a_request_that_times_out_while_a_cluster_elects_is_tried_again() -> None:
    calls, action = _failing(nats.errors.TimeoutError(), nats.errors.TimeoutError())
    assert await Flaky()._call(NatsTarget(CLUSTER), action) == "done"
    assert len(calls) == 3


async def test_a_refused_connection_fails_the_pass_after_a_second_try() -> None:
    calls, action = _failing(*(ConnectionRefusedError() for _ in range(5)))
    with pytest.raises(MessagingUnavailable):
        await Flaky()._call(NatsTarget(CLUSTER), action)
    assert len(calls) == 2


async def test_timeouts_are_retried_within_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clients_nats, "RETRY_BUDGET_SECONDS", 1.2)
    calls, action = _failing(*(nats.errors.TimeoutError() for _ in range(50)))
    with pytest.raises(MessagingUnavailable):
        await Flaky()._call(NatsTarget(CLUSTER), action)
    assert 2 <= len(calls) <= 3
