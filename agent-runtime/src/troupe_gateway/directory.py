"""The operator's directory of a namespace's Agents, Workflows and Triggers, as the gateway
reads it.

A KV watch per namespace, opened on the namespace's first lookup and kept: after that a
lookup is a dict read. A junk value is skipped (logged once per key, never quoted: anyone
with NATS access may write one); a namespace without a bucket yet is empty, and asked
again no sooner than ``RETRY_SECONDS`` later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE
from pydantic import ValidationError

from troupe_runtime.contract import naming
from troupe_runtime.contract.gateway import DirectoryEntry, TargetKind
from troupe_runtime.contract.triggers import TRIGGERS_PREFIX, TriggerDefinition, directory_key

logger = logging.getLogger(__name__)

RETRY_SECONDS = 5.0
INITIAL_WAIT_SECONDS = 5.0
"""How long a first lookup waits for the watch's initial values."""


class _Namespace:
    def __init__(self) -> None:
        self.entries: dict[str, DirectoryEntry] = {}
        self.triggers: dict[str, TriggerDefinition] = {}
        self.loaded = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.junk: set[str] = set()


class Directory:
    def __init__(self, js: JetStreamContext | None = None) -> None:
        """Without ``js`` the directory is empty (a stand-in for tests that override it)."""
        self._js = js
        self._namespaces: dict[str, _Namespace] = {}

    async def entry(self, namespace: str, kind: TargetKind, name: str) -> DirectoryEntry | None:
        entries = await self._loaded(namespace)
        found = entries.get(naming.directory_key(kind, name))
        return found if found is not None and found.name == name else None

    async def entries(self, namespace: str) -> list[DirectoryEntry]:
        return [e for key, e in sorted((await self._loaded(namespace)).items())]

    async def exists(self, namespace: str) -> bool:
        """Whether the namespace has a directory bucket (or is watched already): asked before
        an unauthenticated request (a webhook) makes the gateway watch a namespace."""
        if self._js is None:
            return False
        if namespace in self._namespaces:
            return True
        try:
            await self._js.stream_info(naming.kv_stream(naming.directory_bucket(namespace)))
        except NotFoundError:
            return False
        return True

    async def trigger(self, namespace: str, name: str) -> TriggerDefinition | None:
        """The Trigger's definition as the operator last wrote it, or None."""
        await self._loaded(namespace)
        state = self._namespaces.get(namespace)
        return None if state is None else state.triggers.get(directory_key(name))

    async def triggers(self, namespace: str) -> list[TriggerDefinition]:
        await self._loaded(namespace)
        state = self._namespaces.get(namespace)
        return [] if state is None else [t for _, t in sorted(state.triggers.items())]

    async def _loaded(self, namespace: str) -> dict[str, DirectoryEntry]:
        if self._js is None:
            return {}
        state = self._namespaces.get(namespace)
        if state is None:
            state = self._namespaces[namespace] = _Namespace()
            state.task = asyncio.create_task(self._watch(namespace, state))
        if not state.loaded.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.loaded.wait(), INITIAL_WAIT_SECONDS)
        return state.entries

    async def _watch(self, namespace: str, state: _Namespace) -> None:
        assert self._js is not None
        bucket = naming.directory_bucket(namespace)
        while True:
            try:
                kv = await self._js.key_value(bucket)
            except BucketNotFoundError:
                state.loaded.set()
                await asyncio.sleep(RETRY_SECONDS)
                continue
            watcher = await kv.watch(">")
            try:
                async for raw in watcher:
                    if raw is None:
                        state.loaded.set()
                        continue
                    if raw.operation in (KV_DEL, KV_PURGE) or not raw.value:
                        state.entries.pop(raw.key, None)
                        state.triggers.pop(raw.key, None)
                        continue
                    self._put(namespace, state, raw.key, raw.value)
            except Exception:  # a lost bucket or connection: watch it again
                logger.warning("directory watch of namespace %s ended; reopening", namespace)
            finally:
                with contextlib.suppress(Exception):  # the connection may be gone
                    await watcher.stop()  # type: ignore[no-untyped-call]
            await asyncio.sleep(RETRY_SECONDS)

    def _put(self, namespace: str, state: _Namespace, key: str, value: bytes) -> None:
        if key.startswith(TRIGGERS_PREFIX):
            self._put_trigger(namespace, state, key, value)
            return
        try:
            entry = DirectoryEntry.model_validate_json(value)
        except ValidationError:
            entry = None
        if (
            entry is None
            or entry.namespace != namespace
            or (naming.directory_key(entry.kind, entry.name) != key)
        ):
            state.entries.pop(key, None)
            self._junk(namespace, state, key, "DirectoryEntry")
            return
        state.entries[key] = entry

    def _put_trigger(self, namespace: str, state: _Namespace, key: str, value: bytes) -> None:
        try:
            trigger: TriggerDefinition | None = TriggerDefinition.model_validate_json(value)
        except (ValidationError, ValueError, RecursionError):
            trigger = None
        if trigger is None or trigger.namespace != namespace or directory_key(trigger.name) != key:
            state.triggers.pop(key, None)
            self._junk(namespace, state, key, "TriggerDefinition")
            return
        state.triggers[key] = trigger

    def _junk(self, namespace: str, state: _Namespace, key: str, what: str) -> None:
        if key not in state.junk:
            state.junk.add(key)
            logger.warning(
                "directory of %s: key %s holds no %s; skipped", namespace, key[:200], what
            )

    async def aclose(self) -> None:
        tasks = [state.task for state in self._namespaces.values() if state.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
