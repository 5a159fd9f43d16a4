"""KV counter increments under contention: ``Bucket.update`` vs a bare nats-py CAS loop.

Both contend the same way, in the same run, on one nats-server started here:
``writers`` tasks, each with its own connection, increment one counter
``increments`` times. The bare loop is get → update(last=revision) → on a
wrong-last-sequence error, try again at once. Rounds alternate between the two
and the median rate of each is reported.

    .venv/bin/python bench/state_counter.py --writers 4 --increments 250 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from troupe_devcluster import launcher
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.agent_resources import build_agent_resources
from troupe_runtime.contract.policies import StateBucket
from troupe_runtime.nats.provision import ensure_agent_resources
from troupe_runtime.state import StateStore

KEY = "counter"
Increment = Callable[[], Awaitable[None]]


async def bare_increment(nc: NATS, config: RuntimeConfig, conflicts: list[str]) -> Increment:
    kv = await nc.jetstream().key_value(config.bucket(KEY))

    async def increment() -> None:
        while True:
            try:
                entry = await kv.get(KEY)
                value, revision = json.loads(entry.value or b"0"), entry.revision
            except KeyNotFoundError:
                value, revision = 0, 0
            try:
                await kv.update(KEY, json.dumps(value + 1).encode(), last=revision)
                return
            except KeyWrongLastSequenceError:
                conflicts.append(KEY)

    return increment


async def troupe_increment(nc: NATS, config: RuntimeConfig, conflicts: list[str]) -> Increment:
    bucket = await StateStore(nc.jetstream(), config, conflicts.append).bucket(KEY)

    async def increment() -> None:
        await bucket.update(KEY, lambda n: (n or 0) + 1)

    return increment


async def measure(
    url: str,
    make: Callable[[NATS, RuntimeConfig, list[str]], Awaitable[Increment]],
    writers: int,
    increments: int,
) -> tuple[float, int]:
    """Increments per second and conflicts, connections and bucket set up before the clock."""
    config = RuntimeConfig(
        agent="bench",
        namespace=f"bench-{uuid.uuid4().hex[:8]}",
        state=[StateBucket(name=KEY, conflict_policy="retry")],
    )
    connections = [await nats.connect(url) for _ in range(writers)]
    try:
        await ensure_agent_resources(connections[0].jetstream(), build_agent_resources(config))
        conflicts: list[str] = []
        steps = [await make(nc, config, conflicts) for nc in connections]

        async def writer(increment: Increment) -> None:
            for _ in range(increments):
                await increment()

        started = time.perf_counter()
        await asyncio.gather(*(writer(step) for step in steps))
        elapsed = time.perf_counter() - started

        kv = await connections[0].jetstream().key_value(config.bucket(KEY))
        final = json.loads((await kv.get(KEY)).value or b"0")
        assert final == writers * increments, f"lost updates: {final} != {writers * increments}"
        return writers * increments / elapsed, len(conflicts)
    finally:
        for nc in connections:
            await nc.close()


async def main(url: str, writers: int, increments: int, rounds: int) -> None:
    bare: list[tuple[float, int]] = []
    troupe: list[tuple[float, int]] = []
    for _ in range(rounds):
        bare.append(await measure(url, bare_increment, writers, increments))
        troupe.append(await measure(url, troupe_increment, writers, increments))
    bare_rate = statistics.median(rate for rate, _ in bare)
    troupe_rate = statistics.median(rate for rate, _ in troupe)
    print(f"{writers} writers x {increments} increments, median of {rounds} rounds")
    print(
        f"bare nats-py CAS loop : {bare_rate:8.0f} increments/s, conflicts {[c for _, c in bare]}"
    )
    print(
        f"Bucket.update (retry) : {troupe_rate:8.0f} increments/s, "
        f"conflicts {[c for _, c in troupe]}"
    )
    print(f"ratio troupe/bare     : {troupe_rate / bare_rate:8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--increments", type=int, default=250, help="per writer")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    layout = launcher.up_nats()
    try:
        asyncio.run(main(layout.nats_url, args.writers, args.increments, args.rounds))
    finally:
        launcher.down(layout)
