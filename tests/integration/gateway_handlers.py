"""Handlers the Agents of the gateway's end-to-end tests run in real runtime processes
(``PYTHONPATH`` = the repository root, as for ``workflow_handlers``).

``echo`` answers at once; ``gated`` records the event's id in ``$TEST_GATE.handled`` (one
line per handling, so the test sees a message handled twice) and then waits until the file
``$TEST_GATE`` exists: the test holds calls in flight for as long as it needs, and opens the
gate instead of guessing how long they take.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from troupe_runtime.agent.context import Context

NAME_ENV = "TEST_AGENT_NAME"
GATE_ENV = "TEST_GATE"
GATE_DEADLINE_SECONDS = 50.0
"""Under the runtime's default handler timeout (1m)."""
GATE_POLL_SECONDS = 0.1


def answer(ctx: Context) -> dict[str, Any]:
    data = ctx.event.data
    text = data.get("text") if isinstance(data, dict) else data
    return {"echo": text, "by": os.environ[NAME_ENV]}


async def echo(ctx: Context) -> Any:
    return answer(ctx)


def _record(gate: Path, event_id: str) -> None:
    with gate.with_name(gate.name + ".handled").open("a") as handled:
        handled.write(f"{event_id}\n")


async def gated(ctx: Context) -> Any:
    gate = Path(os.environ[GATE_ENV])
    await asyncio.to_thread(_record, gate, ctx.event.id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GATE_DEADLINE_SECONDS
    while not await asyncio.to_thread(gate.exists):
        if loop.time() > deadline:
            raise TimeoutError(f"the gate {gate} was not opened")
        await asyncio.sleep(GATE_POLL_SECONDS)
    return answer(ctx)
