"""The gateway's settings, from its environment.

STUB (issue 14): owned by helper G1; see /work/issue14-common.md for the variables.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    nats_url: str = "nats://127.0.0.1:4222"
    host: str = "0.0.0.0"
    port: int = 8080
    public_url: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    task_ttl_seconds: float = 7 * 24 * 3600
