"""A pull that is cancelled as its message arrives stops: the cancel is not swallowed.

Python 3.11's ``asyncio.wait_for`` returns the inner result when the wait is cancelled in
the same loop step as the result arrives, so a loop built on it would go on after its task
was cancelled, and whoever awaits the cancelled task (the runtime stopping) would hang.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.aio.msg import Msg

from troupe_runtime.nats.pull import Puller


class _Client:
    """Just what a Puller uses of a client: an inbox prefix and a publish."""

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        return None


async def test_a_cancel_landing_with_a_message_cancels_the_pull() -> None:
    puller = Puller(_Client(), "STREAM", "consumer")  # type: ignore[arg-type]
    task = asyncio.create_task(puller.pull(1, wait=30))
    for _ in range(3):
        await asyncio.sleep(0)  # the pull is now waiting on its inbox
    msg: Any = Msg(_client=None, subject="troupe.x", data=b"{}")  # type: ignore[arg-type]
    await puller._receive(msg)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
