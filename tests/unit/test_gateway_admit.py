"""Services.admit: authenticate, then authorize, then look up, so nobody learns what exists
before RBAC lets them call it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
from troupe_gateway.auth import Caller, Refused
from troupe_gateway.calls import CallRefused, Calls
from troupe_gateway.directory import Directory
from troupe_gateway.services import Services
from troupe_gateway.settings import Settings


class Deny:
    def __init__(self) -> None:
        self.asked: list[str] = []

    async def authenticate(self, headers: Mapping[str, str], namespace: str) -> Caller:
        self.asked.append("authenticate")
        return Caller("system:serviceaccount:a:b")

    async def authorize(self, caller: Caller, namespace: str, resource: Any, name: str) -> None:
        self.asked.append(f"authorize {resource}")
        raise Refused(403, "no")


def services(authorizer: Any) -> Services:
    return Services(
        nc=None,  # type: ignore[arg-type]
        js=None,  # type: ignore[arg-type]
        calls=Calls(None, None, 3600),  # type: ignore[arg-type]
        directory=Directory(),
        authorizer=authorizer,
        kube=None,  # type: ignore[arg-type]
        settings=Settings(),
    )


def test_rbac_refuses_before_the_directory_is_read() -> None:
    authorizer = Deny()
    with pytest.raises(Refused):
        asyncio.run(services(authorizer).admit({}, "a", "Workflow", "wf"))
    assert authorizer.asked == ["authenticate", "authorize workflows"]


def test_an_allowed_call_to_nothing_is_404() -> None:
    class Allow(Deny):
        async def authorize(self, caller: Caller, namespace: str, resource: Any, name: str) -> None:
            return None

    with pytest.raises(CallRefused) as refused:
        asyncio.run(services(Allow()).admit({}, "a", "Agent", "missing"))
    assert refused.value.status == 404
