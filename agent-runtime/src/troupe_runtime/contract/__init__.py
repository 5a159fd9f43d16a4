"""What the operator, the agent runtime, the workflow engine and the CLI agree on.

Pure: models, names and builders, no sockets (a ruff config here bans NATS
clients, asyncio and HTTP). Everything here may be imported by every layer.
"""
