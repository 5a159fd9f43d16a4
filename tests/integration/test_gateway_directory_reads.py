"""The gateway's directory against a real nats-server: entries as the operator writes them,
junk skipped, a namespace without a bucket empty."""

from __future__ import annotations

import asyncio

import nats
from troupe_gateway.directory import Directory

from troupe_runtime.contract import naming
from troupe_runtime.contract.gateway import DirectoryEntry


def test_the_directory_reads_entries_and_skips_junk(nats_url: str) -> None:
    async def scenario() -> None:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        kv = await js.create_key_value(bucket=naming.directory_bucket("dir-a"))
        entry = DirectoryEntry(
            kind="Agent", namespace="dir-a", name="echo", subject="troupe.dir-a.agents.echo.in.p0"
        )
        await kv.put(naming.directory_key("Agent", "echo"), entry.model_dump_json().encode())
        await kv.put(naming.directory_key("Agent", "junk"), b"\x00not json")
        directory = Directory(js)
        try:
            assert await directory.entry("dir-a", "Agent", "echo") == entry
            assert await directory.entry("dir-a", "Agent", "junk") is None
            assert await directory.entries("dir-a") == [entry]
            assert await directory.entries("dir-none") == []
        finally:
            await directory.aclose()
            await js.delete_key_value(naming.directory_bucket("dir-a"))
            await nc.close()

    asyncio.run(scenario())
