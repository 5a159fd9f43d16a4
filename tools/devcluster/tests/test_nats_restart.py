"""The launcher kills and restarts a real nats-server, which keeps what JetStream stored:
how the system tests crash NATS mid-run."""

from __future__ import annotations

import asyncio

import nats
from nats.js.api import StorageType

from troupe_devcluster import launcher, processes


def test_a_restarted_nats_server_keeps_what_jetstream_stored() -> None:
    layout = launcher.up_nats()
    try:
        first = layout.pids["nats-server"]

        async def put() -> None:
            nc = await nats.connect(layout.nats_url)
            kv = await nc.jetstream().create_key_value(bucket="kept", storage=StorageType.FILE)
            await kv.put("key", b"value")
            await nc.close()

        async def get() -> bytes | None:
            nc = await nats.connect(layout.nats_url)
            value = (await (await nc.jetstream().key_value("kept")).get("key")).value
            await nc.close()
            return value

        asyncio.run(put())
        launcher.restart_nats(layout)

        assert layout.pids["nats-server"] != first
        assert not processes.alive(first)
        assert asyncio.run(get()) == b"value"
    finally:
        launcher.down(layout)
