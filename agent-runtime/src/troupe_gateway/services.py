"""What every front end of the gateway is handed: the calls, the directory, auth, Kubernetes
and the settings, plus ``admit``, the one way a request is let in.

"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from troupe_gateway.auth import Authorizer, Caller
from troupe_gateway.calls import CallRefused, Calls
from troupe_gateway.directory import Directory
from troupe_gateway.firing import Firing
from troupe_gateway.kube import Kube
from troupe_gateway.settings import Settings
from troupe_runtime.contract.gateway import DirectoryEntry, TargetKind


@dataclass
class Services:
    nc: NATS
    js: JetStreamContext
    calls: Calls
    directory: Directory
    authorizer: Authorizer
    kube: Kube
    settings: Settings
    firing: Firing = field(init=False)
    """Trigger fires (webhooks and the relay), made from the others."""

    def __post_init__(self) -> None:
        self.firing = Firing(self.js, self.calls, self.directory)

    async def admit(
        self, headers: Mapping[str, str], namespace: str, kind: TargetKind, name: str
    ) -> tuple[Caller, DirectoryEntry]:
        """Authenticate (``auth.Refused`` 401), authorize ``invoke`` on the object (403),
        then look it up (``calls.CallRefused`` 404): nobody learns what exists before RBAC
        lets them call it."""
        caller = await self.authorizer.authenticate(headers, namespace)
        await self.authorizer.authorize(
            caller, namespace, "agents" if kind == "Agent" else "workflows", name
        )
        entry = await self.directory.entry(namespace, kind, name)
        if entry is None:
            raise CallRefused(404, f"namespace {namespace} has no {kind} {name} to call")
        return caller, entry
