"""What is sent to the model is bounded: large tool results offloaded, the whole kept in the window.

Two bounds, so a long tool-heavy conversation neither bloats the log nor overflows the model:

- A tool result larger than ``policy.history.maxToolResultBytes`` is stored whole in the
  namespace's Object Store bucket (``naming.llm_object_store``) and replaced, in the journal
  and in the history alike, by a preview of its start and the object's name.
- Before each model call the history is fitted to the model's context window (``fit``,
  pure): the bodies of the oldest tool results are elided first, then the oldest assistant
  and tool-call arguments; the system prompt, the user input and the last turn are never
  touched. What still does not fit is sent as is, and the provider's refusal (context
  length) dead-letters the message as ``rejected``.

Tokens are estimated at about 4 characters per token (``tokens.py``): an estimate, so the
budget keeps a margin, and the loop takes off it what the provider's count of the last
prompt showed the estimate missed (tool schemas, the chat template, dense text).
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.errors import BucketNotFoundError
from nats.js.object_store import ObjectStore

from troupe_runtime.agent.llm.tokens import estimate_message
from troupe_runtime.agent.llm.types import Message, ToolResult
from troupe_runtime.contract import naming

logger = logging.getLogger(__name__)

ELIDED = "[elided to fit the context window: an earlier tool result of {chars} characters]"
OFFLOADED = (
    "\n[truncated: {size} bytes in all; the whole result is object {name!r} in the "
    "Object Store bucket {bucket!r}]"
)
MARGIN = 0.9
"""Share of the window the estimated history may fill (the estimate is rough)."""
DEFAULT_REPLY_SHARE = 4
"""Without ``maxTokens``, a quarter of the window is kept for the answer."""
OBJECT_MAX_AGE_SECONDS = 7 * 24 * 3600.0


def preview(content: str, size: int, limit: int, bucket: str, name: str) -> str:
    """The start of ``content`` and where the rest is, together at most about ``limit`` bytes."""
    note = OFFLOADED.format(size=size, name=name, bucket=bucket)
    keep = max(0, limit - len(note.encode()))
    head = content.encode()[:keep].decode(errors="ignore")
    return head + note


def history_budget(context_window: int, max_tokens: int | None) -> int:
    """Tokens the history may take: the window, less the answer's share, with a margin."""
    reply = max_tokens if max_tokens is not None else context_window // DEFAULT_REPLY_SHARE
    return max(0, int((context_window - min(reply, context_window // 2)) * MARGIN))


def fit(messages: list[Message], budget: int, protected: int) -> list[Message]:
    """``messages`` within ``budget`` estimated tokens (pure; a new list, inputs unchanged).

    The first ``protected`` messages (system prompt, user input) and the last two (the
    latest answer and its results) are kept whole; of the rest, tool results' bodies go
    first, oldest first, then assistant contents and tool-call arguments.
    """
    total = sum(estimate_message(message) for message in messages)
    if total <= budget:
        return messages
    fitted = list(messages)
    last = max(protected, len(fitted) - 2)
    for role in ("tool", "assistant"):
        for index in range(protected, last):
            if total <= budget:
                return fitted
            message = fitted[index]
            if message.get("role") != role:
                continue
            shrunk = _elided(message)
            total += estimate_message(shrunk) - estimate_message(message)
            fitted[index] = shrunk
    return fitted


def _elided(message: Message) -> Message:
    content = message.get("content")
    chars = len(content) if isinstance(content, str) else 0
    if message.get("role") == "tool":
        return {**message, "content": ELIDED.format(chars=chars)}
    shrunk: Message = {**message, "content": "[elided]" if content else content}
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        shrunk["tool_calls"] = [
            {**call, "function": {**call.get("function", {}), "arguments": "{}"}}
            if isinstance(call, dict) and isinstance(call.get("function"), dict)
            else call
            for call in calls
        ]
    return shrunk


class Offloader:
    """Moves tool results over ``limit`` bytes to the namespace's Object Store bucket.

    The operator provisions the bucket; until it does, the first offload creates it (file
    storage, objects kept a week).
    """

    def __init__(self, js: JetStreamContext, namespace: str, limit: int) -> None:
        self._js = js
        self.bucket = naming.llm_object_store(namespace)
        self.limit = limit
        self._store: ObjectStore | None = None

    async def _bucket(self) -> ObjectStore:
        if self._store is None:
            try:
                self._store = await self._js.object_store(self.bucket)
            except BucketNotFoundError:
                logger.info("creating the Object Store bucket %s", self.bucket)
                self._store = await self._js.create_object_store(
                    self.bucket,
                    ObjectStoreConfig(storage=StorageType.FILE, ttl=OBJECT_MAX_AGE_SECONDS),
                )
        return self._store

    async def bounded(self, result: ToolResult, name: str) -> tuple[ToolResult, str | None]:
        """``result`` as the history keeps it, and the object's name when it was offloaded."""
        data = result.content.encode()
        if len(data) <= self.limit:
            return result, None
        store = await self._bucket()
        await store.put(name, data)
        content = preview(result.content, len(data), self.limit, self.bucket, name)
        return ToolResult(content, result.is_error), name
