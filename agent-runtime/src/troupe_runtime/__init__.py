"""Troupe agent runtime: the process that runs an agent's handler on NATS JetStream."""

from troupe_runtime.contract.version import VERSION as __version__

__all__ = ["__version__"]
