"""Troupe agent runtime: the process that runs an agent's handler on NATS JetStream."""

__version__ = "0.1.0"
