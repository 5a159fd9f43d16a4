"""Operator settings from environment variables, overridable by command-line flags.

=========================  ===========================================  =======================
Variable                   Meaning                                      Default
=========================  ===========================================  =======================
TROUPE_NATS_URL            NATS for agents that name none (a comma-     nats://nats:4222
                           separated list: every server of a cluster)
TROUPE_NATS_REPLICAS       replicas of every stream and bucket, unless  1
                           an object's spec.nats.replicas says (1-5;
                           3 on a three-server cluster)
TROUPE_NATS_CREDENTIALS    the operator's own NATS credentials file     (none)
TROUPE_WATCH_NAMESPACES    comma-separated namespaces; empty = all      (all)
TROUPE_LOG_FORMAT          ``plain`` or ``json``                        plain
TROUPE_RESYNC_SECONDS      how often status and drift are re-checked    30
TROUPE_BUDGET_REFRESH      seconds between passes over each Budget      10
TROUPE_AUTOSCALE_SECONDS   how often autoscaled Agents' lag is read     2
TROUPE_CRD_RECHECK         seconds before "is KEDA installed?" is re-read  60
TROUPE_METRICS_PORT        Prometheus metrics port; 0 turns them off    9090
TROUPE_HEALTH_PORT         the /healthz (and /readyz) endpoint's port   8081
TROUPE_RUNTIME_IMAGE       the image of workflow engines                troupe/runtime:<VERSION>
TROUPE_FINALIZER_TIMEOUT   seconds deletion waits on NATS, then lets go  120
TROUPE_LEASE_NAME          the Lease replicas elect the active one by   troupe-operator
TROUPE_LEASE_NAMESPACE     that Lease's namespace                       POD_NAMESPACE, default
TROUPE_LEASE_DURATION      seconds a standby waits on a silent holder   10
TROUPE_RENEW_DEADLINE      seconds unrenewed before the holder exits    7
TROUPE_RETRY_PERIOD        seconds between tries to acquire or renew    2
POD_NAME                   the replica's identity in the Lease          the host name
=========================  ===========================================  =======================

The election's defaults fail over within seconds yet tolerate a slow API server: the holder
renews every 2 s, so it has three tries before its 7 s deadline, and exits 3 s before any
standby may take over (10 s after it last saw a renewal), which covers the time a dying
holder needs to stop and clocks that run at slightly different rates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from troupe_operator.api.agent import DEFAULT_RUNTIME_IMAGE
from troupe_operator.builders.lease import ElectionTimings
from troupe_runtime.contract.nats_servers import MAX_REPLICAS, InvalidNatsUrl, server_urls

LogFormat = Literal["plain", "json"]


@dataclass(frozen=True)
class OperatorSettings:
    """Everything the operator is configured with."""

    nats_url: str = "nats://nats:4222"
    nats_replicas: int = 1
    """Replicas of the streams and buckets made for objects whose spec names none."""
    nats_credentials: Path | None = None
    namespaces: tuple[str, ...] = ()
    log_format: LogFormat = "plain"
    resync_seconds: float = 30.0
    budget_refresh_seconds: float = 10.0
    """How often each Budget's ledger is read into status (and its selector resolved)."""
    autoscale_seconds: float = 2.0
    """How often the lag of Agents with runtime.autoscale is read: the bound on the delay
    before an agent at zero replicas is scaled up for its first message."""
    crd_recheck_seconds: float = 60.0
    """How long the answer to "does the cluster serve KEDA's ScaledObjects?" is kept."""
    metrics_port: int = 9090
    health_port: int = 8081
    runtime_image: str = DEFAULT_RUNTIME_IMAGE
    finalizer_timeout_seconds: float = 120.0
    """How long deletion waits on NATS cleanup before it lets the object go (with an Event)."""
    # The pod's own IP (POD_IP) when set: replicas sharing a host must not clash.
    bind_address: str = "0.0.0.0"
    lease_name: str = "troupe-operator"
    lease_namespace: str = "default"
    election: ElectionTimings = field(default_factory=ElectionTimings)
    pod_name: str = ""
    """The replica's name (POD_NAME); empty: the host name. A random suffix makes it unique."""

    @property
    def all_namespaces(self) -> bool:
        return not self.namespaces

    def with_namespaces(
        self, namespaces: list[str] | None, all_namespaces: bool
    ) -> OperatorSettings:
        """Flags win over the environment: ``--all-namespaces`` or ``--namespace`` (repeated)."""
        if all_namespaces:
            return replace(self, namespaces=())
        if namespaces:
            return replace(self, namespaces=tuple(namespaces))
        return self


def _log_format(value: str) -> LogFormat:
    if value not in ("plain", "json"):
        raise ValueError(f"TROUPE_LOG_FORMAT must be plain or json, not {value!r}")
    return "json" if value == "json" else "plain"


def _replicas(value: str) -> int:
    if not value.strip().isdigit() or not 1 <= int(value) <= MAX_REPLICAS:
        raise ValueError(f"TROUPE_NATS_REPLICAS must be 1 to {MAX_REPLICAS}, not {value!r}")
    return int(value)


def _nats_url(value: str) -> str:
    """The URL as given, once every comma-separated server in it is a NATS URL."""
    try:
        server_urls(value)
    except InvalidNatsUrl as error:
        raise ValueError(f"TROUPE_NATS_URL: {error}") from error
    return value


def from_environment(environ: Mapping[str, str] = os.environ) -> OperatorSettings:
    """Read the ``TROUPE_*`` variables; unset ones keep their defaults."""
    defaults = OperatorSettings()
    credentials = environ.get("TROUPE_NATS_CREDENTIALS")
    namespaces = environ.get("TROUPE_WATCH_NAMESPACES", "")
    return OperatorSettings(
        nats_url=_nats_url(environ.get("TROUPE_NATS_URL", defaults.nats_url)),
        nats_replicas=_replicas(environ.get("TROUPE_NATS_REPLICAS", str(defaults.nats_replicas))),
        nats_credentials=Path(credentials) if credentials else None,
        namespaces=tuple(n.strip() for n in namespaces.split(",") if n.strip()),
        log_format=_log_format(environ.get("TROUPE_LOG_FORMAT", defaults.log_format)),
        resync_seconds=float(environ.get("TROUPE_RESYNC_SECONDS", defaults.resync_seconds)),
        budget_refresh_seconds=float(
            environ.get("TROUPE_BUDGET_REFRESH", defaults.budget_refresh_seconds)
        ),
        autoscale_seconds=float(
            environ.get("TROUPE_AUTOSCALE_SECONDS", defaults.autoscale_seconds)
        ),
        crd_recheck_seconds=float(environ.get("TROUPE_CRD_RECHECK", defaults.crd_recheck_seconds)),
        metrics_port=int(environ.get("TROUPE_METRICS_PORT", defaults.metrics_port)),
        health_port=int(environ.get("TROUPE_HEALTH_PORT", defaults.health_port)),
        runtime_image=environ.get("TROUPE_RUNTIME_IMAGE", defaults.runtime_image),
        finalizer_timeout_seconds=float(
            environ.get("TROUPE_FINALIZER_TIMEOUT", defaults.finalizer_timeout_seconds)
        ),
        bind_address=environ.get("POD_IP") or defaults.bind_address,
        lease_name=environ.get("TROUPE_LEASE_NAME") or defaults.lease_name,
        lease_namespace=(
            environ.get("TROUPE_LEASE_NAMESPACE")
            or environ.get("POD_NAMESPACE")
            or defaults.lease_namespace
        ),
        election=ElectionTimings(
            lease_duration=int(
                environ.get("TROUPE_LEASE_DURATION", defaults.election.lease_duration)
            ),
            renew_deadline=float(
                environ.get("TROUPE_RENEW_DEADLINE", defaults.election.renew_deadline)
            ),
            retry_period=float(environ.get("TROUPE_RETRY_PERIOD", defaults.election.retry_period)),
        ),
        pod_name=environ.get("POD_NAME", defaults.pod_name),
    )
