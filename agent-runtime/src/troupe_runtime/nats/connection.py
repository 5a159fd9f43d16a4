"""Connecting to NATS: credentials, TLS, and reconnecting forever.

A pod may start before NATS (a fresh cluster, a NATS upgrade) and NATS may
restart under a running pod: either way the runtime waits and reconnects,
every ``RECONNECT_WAIT_SECONDS``, instead of crash-looping.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import nats
from nats.aio.client import Client

from troupe_runtime.contract.agent_config import NatsSettings

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
        "servers": [settings.url],
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


async def connect(settings: NatsSettings, name: str) -> Client:
    """Connect; with unlimited attempts nats-py retries even the first connection."""
    return await nats.connect(
        **connect_options(settings, name),
        disconnected_cb=_log_disconnect,
        reconnected_cb=_log_reconnect,
        error_cb=_log_error,
    )
