"""Every stream and bucket a client creates gets the replicas its settings ask for.

Streams are created in many places: the operator's provisioning, and the runtime, the
workflow engine and the gateway creating the buckets they need when missing (budgets,
sessions, usage, rate limits, approvals, history objects). Rather than thread a replica
count through each of them, the JetStream context they all use applies it:
``ReplicatedJetStream`` sets ``num_replicas`` on every stream it creates or updates, and
nats-py creates KV and Object Store buckets through ``add_stream`` too.

Raising, never lowering: provisioning converges a stream with fewer replicas than asked up
to the count (JetStream moves the data), and leaves one with more alone. Namespace-wide
streams and buckets (the event log, the budget and rate-limit buckets) are shared by agents
that may ask for different counts; converging both ways would flip them pass after pass,
while the larger count is always safe. Lowering is a person's decision (``nats stream edit``).
"""

from __future__ import annotations

from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StreamConfig, StreamInfo

from troupe_runtime.contract.nats_servers import server_urls


class ReplicatedJetStream(JetStreamContext):
    """A JetStream context whose streams (KV and Object Store buckets included) are created
    and updated with at least ``replicas`` copies."""

    def __init__(self, conn: Client, replicas: int, **options: Any) -> None:
        super().__init__(conn, **options)
        self.replicas = replicas

    def _replicated(self, config: StreamConfig | None, params: dict[str, Any]) -> StreamConfig:
        config = (config or StreamConfig()).evolve(**params)
        return config.evolve(num_replicas=max(config.num_replicas or 1, self.replicas))

    async def add_stream(self, config: StreamConfig | None = None, **params: Any) -> StreamInfo:
        return await super().add_stream(self._replicated(config, params))

    async def update_stream(self, config: StreamConfig | None = None, **params: Any) -> StreamInfo:
        return await super().update_stream(self._replicated(config, params))


def replicas_of(js: JetStreamContext) -> int:
    """The replicas a context gives what it creates: 1 for a plain one."""
    return js.replicas if isinstance(js, ReplicatedJetStream) else 1


async def connect_without_retry(url: str, **options: Any) -> Client:
    """Connect to the first server of ``url`` (a comma-separated list) that answers.

    For clients that never reconnect (the operator, the CLI): nats-py gives up after its
    first failed server when reconnecting is off, so with one server of three down a third
    of the connections would fail. Each server is tried in turn, starting with each one in
    the list's order; the last error is raised when none answers."""
    servers = server_urls(url)
    last: BaseException | None = None
    for start in range(len(servers)):
        client = Client()
        try:
            await client.connect(
                servers=servers[start:] + servers[:start],
                dont_randomize=True,
                allow_reconnect=False,
                **options,
            )
        except (OSError, TimeoutError, nats.errors.Error) as error:
            last = error
            continue
        return client
    assert last is not None
    raise last
