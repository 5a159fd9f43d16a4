"""Pull requests against one durable consumer, each of a kind the loop chooses.

nats-py's ``fetch`` ends every empty round in a lingering request, which
would stall a round that only asks a priority level what it has *now*. The
loop needs both kinds apart: a no-wait request, and a lingering one. One
inbox serves all requests of a puller; the server marks the end of a request
with a status message sent to that request's own reply subject, while the
messages themselves carry their stream subject, so a message that arrives
after its request was given up on is simply handed to the next request.
"""

from __future__ import annotations

import asyncio
import itertools
import json

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import Header

from troupe_runtime.contract import naming

# How long past a request's own expiry to wait for the server's answer; only
# a lost connection makes the server miss it.
SERVER_ANSWER_MARGIN_SECONDS = 5.0
HEARTBEAT_STATUS = "100"


def status_of(msg: Msg) -> str | None:
    return msg.headers.get(Header.STATUS.value) if msg.headers else None


class Puller:
    """Issues pull requests, one at a time, to ``stream``/``consumer``."""

    def __init__(self, nc: Client, stream: str, consumer: str) -> None:
        self._nc = nc
        self._next_subject = naming.pull_next_subject(stream, consumer)
        self._prefix = nc.new_inbox()
        self._ids = itertools.count()
        self._inbox: asyncio.Queue[Msg] = asyncio.Queue()
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        self._subscription = await self._nc.subscribe(f"{self._prefix}.*", cb=self._receive)

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None

    async def _receive(self, msg: Msg) -> None:
        self._inbox.put_nowait(msg)

    async def pull(self, batch: int, wait: float | None = None) -> list[Msg]:
        """Up to ``batch`` messages: those available now, or (``wait``) the first to come."""
        reply = f"{self._prefix}.{next(self._ids)}"
        request: dict[str, object] = {"batch": batch}
        if wait is None:
            request["no_wait"] = True
        else:
            request["expires"] = int(wait * 1e9)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (wait or 0.0) + SERVER_ANSWER_MARGIN_SECONDS
        await self._nc.publish(self._next_subject, json.dumps(request).encode(), reply=reply)
        messages: list[Msg] = []
        while len(messages) < batch:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the message when
            # a cancel lands as it arrives, swallowing the cancel, and the task that stops
            # the loop (the runtime's shutdown) then waits for it forever.
            try:
                async with asyncio.timeout(deadline - loop.time()):
                    msg = await self._inbox.get()
            except TimeoutError:
                break
            status = status_of(msg)
            if status is None:
                messages.append(msg)
            elif msg.subject == reply and status != HEARTBEAT_STATUS:
                break
        return messages
