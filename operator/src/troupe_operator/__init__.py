"""Troupe operator: reconciles Agents and Workflows into Deployments wired to NATS JetStream."""

from troupe_runtime.contract.version import VERSION as __version__

__all__ = ["__version__"]
