"""The gateway app answers health, readiness and metrics beside the front ends' routes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from starlette.testclient import TestClient
from troupe_gateway.app import build_app
from troupe_gateway.calls import Calls
from troupe_gateway.directory import Directory
from troupe_gateway.services import Services
from troupe_gateway.settings import Settings


def services(connected: bool) -> Services:
    stand_in: Any = None
    return Services(
        nc=SimpleNamespace(is_connected=connected),  # type: ignore[arg-type]
        js=stand_in,
        calls=Calls(None, None, 3600),  # type: ignore[arg-type]
        directory=Directory(),
        authorizer=stand_in,
        kube=stand_in,
        settings=Settings(),
    )


def test_health_readiness_and_metrics() -> None:
    client = TestClient(build_app(services(connected=True)))
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_not_ready_without_nats() -> None:
    client = TestClient(build_app(services(connected=False)))
    assert client.get("/readyz").status_code == 503
