"""Connecting to NATS: credentials, TLS, reconnecting forever, and publishing within limits.

A pod may start before NATS (a fresh cluster, a NATS upgrade) and NATS may
restart under a running pod: either way the runtime waits and reconnects,
every ``RECONNECT_WAIT_SECONDS``, instead of crash-looping (as long as the runtime's
liveness bound allows: past it, ``/healthz`` fails and Kubernetes restarts the pod).

The server answers a protocol violation, such as a message over its
``max_payload``, with an error and closes the connection, and nats-py then
gives up on it for good. So the client refuses such a publish itself, before
anything is sent (``PayloadTooLarge``), and whoever holds a connection learns
of its closing (``closed_cb``) to open a new one.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.client import Client

from troupe_runtime.contract import wire
from troupe_runtime.contract.agent_config import NatsSettings
from troupe_runtime.contract.nats_servers import server_urls
from troupe_runtime.nats.replicas import ReplicatedJetStream

logger = logging.getLogger(__name__)

RECONNECT_WAIT_SECONDS = 2


def tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    if settings.tls_ca_file is None and settings.tls_cert_file is None:
        return None
    context = ssl.create_default_context(
        cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None
    )
    if settings.tls_cert_file is not None:
        context.load_cert_chain(
            str(settings.tls_cert_file),
            str(settings.tls_key_file) if settings.tls_key_file else None,
        )
    return context


def connect_options(settings: NatsSettings, name: str) -> dict[str, Any]:
    options: dict[str, Any] = {
        "servers": server_urls(settings.url),
        "name": name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": RECONNECT_WAIT_SECONDS,
    }
    if settings.credentials_file is not None:
        options["user_credentials"] = str(settings.credentials_file)
    if (context := tls_context(settings)) is not None:
        options["tls"] = context
    return options


async def _log_disconnect() -> None:
    logger.warning("disconnected from NATS")


async def _log_reconnect() -> None:
    logger.info("reconnected to NATS")


async def _log_error(error: Exception) -> None:
    logger.warning("NATS connection error: %s", error)


class PayloadTooLarge(nats.errors.MaxPayloadError):
    """A message, with its headers, over the server's ``max_payload``: never sent."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class GuardedClient(Client):
    """A client that sizes every message with its headers before it is sent.

    nats-py compares the payload alone with ``max_payload``; a payload just
    under it with headers over it reached the server, which closed the
    connection for good. JetStream publishes and requests go through here too.
    """

    def __init__(self, replicas: int = 1) -> None:
        super().__init__()
        self.replicas = replicas

    def jetstream(self, **opts: Any) -> ReplicatedJetStream:
        """A context whose streams and buckets get ``replicas`` copies (``nats.replicas``)."""
        return ReplicatedJetStream(self, self.replicas, **opts)

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        reply: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        reason = wire.oversize_reason("a message", subject, payload, headers, self.max_payload)
        if reason is not None:
            raise PayloadTooLarge(reason)
        await super().publish(subject, payload, reply, headers)


async def connect(
    settings: NatsSettings,
    name: str,
    *,
    closed_cb: Callable[[], Awaitable[None]] | None = None,
) -> Client:
    """Connect; with unlimited attempts nats-py retries even the first connection.

    ``closed_cb`` runs when the connection is closed for good (by ``close()``,
    or by nats-py after the server reported a protocol error)."""

    async def closed() -> None:
        logger.warning("NATS connection closed: %s", client.last_error or "by the runtime")
        if closed_cb is not None:
            await closed_cb()

    client = GuardedClient(settings.replicas)
    await client.connect(
        **connect_options(settings, name),
        disconnected_cb=_log_disconnect,
        reconnected_cb=_log_reconnect,
        error_cb=_log_error,
        closed_cb=closed,
    )
    return client
