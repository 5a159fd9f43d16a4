"""What every Troupe pod shares with the operator that builds it.

The operator puts the pod's IP in ``POD_IP`` so the health server binds to it
alone, probes the two paths below on the ``health`` port, starts the container
with one of the entrypoint commands, and mounts the config (compact JSON from the
pod's ConfigMap) read-only at ``CONFIG_PATH``.

The config is a file, never an env var: Linux caps one environment string at
128 KiB, and a valid Agent with a large schema passes that long before its
ConfigMap's 1 MiB. ``CONFIG_PATH_ENV`` (a path, not the JSON) stays so that local
runs can point a process elsewhere; tests pass ``--config`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath

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

CONFIG_DIR = PurePosixPath("/etc/troupe")
"""Where the runtime's or engine's ConfigMap is mounted, holding just the config."""
CONFIG_FILE_NAME = "config.json"
"""The ConfigMap key, and the file's name in ``CONFIG_DIR``."""
CONFIG_PATH = CONFIG_DIR / CONFIG_FILE_NAME
CONFIG_PATH_ENV = "TROUPE_CONFIG"
"""A config file to read instead of ``CONFIG_PATH``, for runs outside a pod."""

AGENT_COMMAND: tuple[str, ...] = ("python", "-m", "troupe_runtime.agent")
ENGINE_COMMAND: tuple[str, ...] = ("python", "-m", "troupe_runtime.workflow")


def bind_host(env: Mapping[str, str]) -> str:
    """The pod's own IP when the operator passes it, so probes reach only this pod."""
    return env.get(POD_IP_ENV) or ANY_HOST
