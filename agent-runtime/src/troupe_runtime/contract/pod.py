"""What every Troupe pod shares with the operator that builds it.

The operator puts the pod's IP in ``POD_IP`` so the health server binds to it
alone, probes the two paths below on the ``health`` port, and starts the
container with one of the entrypoint commands.
"""

from __future__ import annotations

from collections.abc import Mapping

POD_IP_ENV = "POD_IP"
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"
DEFAULT_HEALTH_PORT = 8080
ANY_HOST = "0.0.0.0"

RUNTIME_CONTAINER = "runtime"
"""The container of an agent's or engine's pod that runs Troupe; a sidecar may not take it."""
RESERVED_ENV_PREFIX = "TROUPE_"
RESERVED_ENV_NAMES: tuple[str, ...] = (POD_IP_ENV, "POD_NAME", "PYTHONPATH")
"""Variables the operator sets in the runtime container (with every ``TROUPE_`` one): a
spec's ``env`` may not set them, or the pod would carry two values for one name."""

AGENT_COMMAND: tuple[str, ...] = ("python", "-m", "troupe_runtime.agent")
ENGINE_COMMAND: tuple[str, ...] = ("python", "-m", "troupe_runtime.workflow")


def bind_host(env: Mapping[str, str]) -> str:
    """The pod's own IP when the operator passes it, so probes reach only this pod."""
    return env.get(POD_IP_ENV) or ANY_HOST
