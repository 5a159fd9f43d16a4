"""The runtime's NATS I/O: connection, pull requests, provisioning, stream reads, KV and logs.

The only NATS I/O below the agent and the engine; the operator uses its
provisioning and nothing else.
"""
