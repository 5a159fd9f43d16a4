"""The gateway's settings, from its environment: a bad value stops the process at start-up
with a sentence naming the variable, instead of a gateway that half works."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from troupe_runtime.contract.nats_servers import MAX_REPLICAS, InvalidNatsUrl, server_urls

MAX_PORT = 65535
MAX_TASK_TTL_SECONDS = 365 * 24 * 3600
"""A year: JetStream holds a max age in nanoseconds, and no task needs to outlive this."""


class SettingsError(ValueError):
    """An environment variable the gateway cannot run with; the message names it."""


@dataclass(frozen=True)
class Settings:
    nats_url: str = "nats://127.0.0.1:4222"
    nats_replicas: int = 1
    """Replicas of the buckets the gateway creates (``TROUPE_NATS_REPLICAS``, as the operator)."""
    host: str = "0.0.0.0"
    port: int = 8080
    public_url: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    task_ttl_seconds: float = 7 * 24 * 3600
    push_private_networks: bool = False
    """Whether A2A push-notification URLs may name private, loopback or link-local addresses
    (a receiver inside the cluster). Off: a caller cannot make the gateway post to its own
    network (SSRF)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``NATS_URL`` and ``TROUPE_GATEWAY_*``; raises ``SettingsError``."""
        env = os.environ if env is None else env
        default = cls()
        cert = env.get("TROUPE_GATEWAY_TLS_CERT") or None
        key = env.get("TROUPE_GATEWAY_TLS_KEY") or None
        if (cert is None) != (key is None):
            raise SettingsError(
                "TROUPE_GATEWAY_TLS_CERT and TROUPE_GATEWAY_TLS_KEY go together: set both "
                "for TLS, or neither"
            )
        return cls(
            nats_url=_nats_url(
                env,
                "TROUPE_NATS_URL" if env.get("TROUPE_NATS_URL") else "NATS_URL",
                default.nats_url,
            ),
            nats_replicas=_replicas(env.get("TROUPE_NATS_REPLICAS")),
            # The pod's own IP where the chart gives one: replicas on one process node would
            # otherwise share 0.0.0.0:8080.
            host=env.get("TROUPE_GATEWAY_HOST") or env.get("POD_IP") or default.host,
            port=_port(env.get("TROUPE_GATEWAY_PORT"), default.port),
            public_url=_public_url(env.get("TROUPE_GATEWAY_PUBLIC_URL") or None),
            tls_cert=cert,
            tls_key=key,
            task_ttl_seconds=_ttl(env.get("TROUPE_GATEWAY_TASK_TTL"), default.task_ttl_seconds),
            push_private_networks=_flag(
                env, "TROUPE_GATEWAY_PUSH_PRIVATE_NETWORKS", default.push_private_networks
            ),
        )


def _url(env: Mapping[str, str], name: str, default: str, schemes: tuple[str, ...]) -> str:
    value = env.get(name) or default
    if urlsplit(value).scheme not in schemes or not urlsplit(value).netloc:
        raise SettingsError(f"{name} must be a URL with scheme {' or '.join(schemes)}")
    return value


def _nats_url(env: Mapping[str, str], name: str, default: str) -> str:
    """One NATS server URL or a cluster's, comma-separated (``nats_servers``)."""
    value = env.get(name) or default
    try:
        servers = server_urls(value)
    except InvalidNatsUrl as error:
        raise SettingsError(f"{name}: {error}") from error
    for server in servers:
        _url({name: server}, name, server, ("nats", "tls"))
    return value


def _replicas(value: str | None) -> int:
    if not value:
        return 1
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_REPLICAS:
        raise SettingsError(f"TROUPE_NATS_REPLICAS must be 1 to {MAX_REPLICAS}")
    return int(value)


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise SettingsError(f"{name} must be true or false")


def _port(value: str | None, default: int) -> int:
    if not value:
        return default
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) <= MAX_PORT:
        raise SettingsError(f"TROUPE_GATEWAY_PORT must be a port number, 1 to {MAX_PORT}")
    return int(value)


def _public_url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise SettingsError(
            "TROUPE_GATEWAY_PUBLIC_URL must be an http or https URL without a query, "
            "e.g. https://gateway.example.com"
        )
    return value.rstrip("/")


def _ttl(value: str | None, default: float) -> float:
    """Seconds, or with a unit: ``90s``, ``30m``, ``12h``, ``7d``."""
    if not value:
        return default
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    scale = units.get(value[-1], 1)
    number = value[:-1] if value[-1] in units else value
    try:
        seconds = float(number) * scale
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_TASK_TTL_SECONDS:
        raise SettingsError(
            "TROUPE_GATEWAY_TASK_TTL must be a positive duration up to 365d, e.g. 7d or 3600"
        )
    return seconds
