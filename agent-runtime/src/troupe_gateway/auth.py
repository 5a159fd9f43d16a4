"""Who is calling, and may they: bearer tokens checked by TokenReview, per-namespace API
keys from Secrets, then a SubjectAccessReview on the virtual verb ``invoke``.

STUB (issue 14): signatures agreed in /work/issue14-common.md; helper G4 implements.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

Resource = Literal["agents", "workflows", "triggers"]


@dataclass(frozen=True)
class Caller:
    user: str
    """A Kubernetes user name (``system:serviceaccount:<ns>:<sa>`` for tokens and API keys)."""
    groups: tuple[str, ...] = ()
    via: Literal["token", "api-key", "anonymous"] = "token"


class Refused(Exception):
    """401 (no or bad credentials) or 403 (RBAC says no), with a reason safe to show."""

    def __init__(self, status: Literal[401, 403], reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Authorizer(Protocol):
    async def authenticate(self, headers: Mapping[str, str], namespace: str) -> Caller:
        """Raises ``Refused(401)``."""
        ...

    async def authorize(
        self, caller: Caller, namespace: str, resource: Resource, name: str
    ) -> None:
        """Raises ``Refused(403)`` unless RBAC lets ``caller`` ``invoke`` it."""
        ...
