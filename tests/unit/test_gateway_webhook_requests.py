"""``POST /hooks/{namespace}/{trigger}`` on the app itself, with stand-ins for the directory,
the API server and the fires: whatever headers, body and path arrive, an unsigned request
is refused (401, 404, 413) with a reason that never quotes the secret, and nothing is fired,
marked or counted; a signed one reaches the fire, and is not marked seen when it did not
fire."""

from __future__ import annotations

import string
import time
from functools import cache
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from nats.js.errors import KeyWrongLastSequenceError
from starlette.testclient import TestClient
from troupe_gateway.app import build_app
from troupe_gateway.calls import CallRefused, Calls
from troupe_gateway.directory import Directory
from troupe_gateway.services import Services
from troupe_gateway.settings import Settings

from troupe_runtime.contract.triggers import TriggerDefinition, sign

SECRET = b"the-shared-secret-of-the-unit-tests"
TRIGGER = TriggerDefinition.model_validate(
    {
        "namespace": "team",
        "name": "hook",
        "uid": "u-1",
        "spec": {
            "target": {"kind": "Agent", "name": "echo"},
            "source": {"webhook": {"secretRef": {"name": "hook-secret"}}},
        },
    }
)


class StandInDirectory(Directory):
    async def exists(self, namespace: str) -> bool:
        return namespace == "team"

    async def trigger(self, namespace: str, name: str) -> TriggerDefinition | None:
        return TRIGGER if (namespace, name) == ("team", "hook") else None


class StandInKube:
    async def secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return {"secret": SECRET} if (namespace, name) == ("team", "hook-secret") else None


class StandInSeen:
    """The webhook-seen bucket: marks kept in a set."""

    def __init__(self) -> None:
        self.marks: set[str] = set()

    async def create(self, key: str, value: bytes) -> int:
        if key in self.marks:
            raise KeyWrongLastSequenceError()
        self.marks.add(key)
        return 1

    async def delete(self, key: str, last: int | None = None) -> bool:
        self.marks.discard(key)
        return True


class StandInJetStream:
    def __init__(self) -> None:
        self.seen = StandInSeen()

    async def key_value(self, bucket: str) -> StandInSeen:
        return self.seen

    async def stream_info(self, name: str) -> Any:
        return SimpleNamespace(config=SimpleNamespace(max_age=3600.0))


class StandInFiring:
    """Records what reached it; the target is never found (so nothing needs NATS)."""

    def __init__(self) -> None:
        self.reached: list[str] = []

    async def target(self, trigger: TriggerDefinition) -> Any:
        self.reached.append("target")
        raise CallRefused(503, "the target echo is not in the directory")

    async def failed(self, trigger: TriggerDefinition, reason: str) -> None:
        self.reached.append(f"failed: {reason}")


JETSTREAM = StandInJetStream()


@cache
def gateway() -> tuple[TestClient, StandInFiring]:
    services = Services(
        nc=SimpleNamespace(is_connected=True),  # type: ignore[arg-type]
        js=JETSTREAM,  # type: ignore[arg-type]
        calls=Calls(None, None, 3600),  # type: ignore[arg-type]
        directory=StandInDirectory(),
        authorizer=None,  # type: ignore[arg-type]
        kube=StandInKube(),  # type: ignore[arg-type]
        settings=Settings(),
    )
    firing = StandInFiring()
    services.firing = firing  # type: ignore[assignment]
    return TestClient(build_app(services)), firing


ASCII = st.text(alphabet=string.printable.strip() + " ", max_size=80)
HEADER_NAME = st.sampled_from(
    ["Troupe-Timestamp", "troupe-timestamp", "Troupe-Signature", "TROUPE-SIGNATURE", "X-Other"]
)
HEADERS = st.lists(st.tuples(HEADER_NAME, ASCII), max_size=5)
SEGMENT = st.text(
    alphabet=string.ascii_letters + string.digits + "-._~", min_size=1, max_size=30
).filter(lambda segment: segment.strip(".") != "")  # "." and ".." are no path segments


@settings(max_examples=150, deadline=None)
@given(
    headers=HEADERS,
    body=st.binary(max_size=2000),
    path=st.tuples(st.just("team") | SEGMENT, st.just("hook") | SEGMENT),
)
def test_no_unsigned_request_fires_and_no_refusal_quotes_the_secret(
    headers: list[tuple[str, str]], body: bytes, path: tuple[str, str]
) -> None:
    client, firing = gateway()
    firing.reached.clear()
    answer = client.post(f"/hooks/{path[0]}/{path[1]}", content=body, headers=headers)
    assert answer.status_code in (401, 404), answer.text
    assert answer.json()["reason"]
    assert SECRET.decode() not in answer.text
    assert firing.reached == []
    assert JETSTREAM.seen.marks == set()


def test_a_body_past_the_limit_is_refused_before_its_signature_is_checked() -> None:
    client, firing = gateway()
    firing.reached.clear()
    answer = client.post("/hooks/team/hook", content=b"x" * ((1 << 20) + 1))
    assert answer.status_code == 413
    assert firing.reached == []


def test_a_signed_request_reaches_the_fire_and_its_failure_is_counted() -> None:
    client, firing = gateway()
    firing.reached.clear()
    body = b'{"a": 1}'
    timestamp = str(int(time.time()))
    answer = client.post(
        "/hooks/team/hook",
        content=body,
        headers={"Troupe-Timestamp": timestamp, "Troupe-Signature": sign(SECRET, timestamp, body)},
    )
    assert answer.status_code == 503
    assert answer.json()["reason"] == "the target echo is not in the directory"
    assert firing.reached == ["target", "failed: the target echo is not in the directory"]
    assert JETSTREAM.seen.marks == set(), "a delivery that did not fire is no replay"
