"""A run's event log (the truth) and its projection in KV (for fast reads).

Events are appended with their deterministic key as ``Nats-Msg-Id``: an engine
that repeats a transition after a crash is de-duplicated by JetStream. The
projection is written with revision checks; on a conflict it is rebuilt from
the log, which always wins.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.contract.run_events import Event, encode_event
from troupe_runtime.contract.run_state import RunState, apply, replay
from troupe_runtime.nats.streams import read_events


class RunLog:
    def __init__(self, js: JetStreamContext, kv: KeyValue, config: EngineConfig) -> None:
        self._js = js
        self._kv = kv
        self._config = config
        self._revisions: dict[str, int] = {}

    async def append(self, state: RunState | None, event: Event) -> RunState | None:
        """Append ``event``; return the new state, or None if the log already had it."""
        ack = await self._js.publish(
            self._config.subject("events", event.run_id),
            encode_event(event),
            headers={Header.MSG_ID.value: event.key},
        )
        if ack.duplicate:
            return None
        new_state = apply(state, event)
        await self._save(new_state)
        if new_state.terminal:
            self._revisions.pop(new_state.run_id, None)  # a finished run is not written again
        return new_state

    async def events(self, run_id: str) -> list[Event]:
        """Every event of one run, in order, read back from the stream."""
        return await read_events(
            self._js, self._config.stream, self._config.subject("events", run_id)
        )

    async def rebuild(self, run_id: str) -> RunState | None:
        state = replay(await self.events(run_id))
        if state is not None:
            await self._save(state)
        return state

    async def projected(self, run_id: str) -> RunState | None:
        try:
            entry = await self._kv.get(run_id)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        if entry.revision is not None:
            # Known now, so a rebuild that follows writes with a plain compare-and-set.
            self._revisions[run_id] = entry.revision
        return RunState.model_validate_json(entry.value)

    async def run_ids(self) -> list[str]:
        try:
            return list(await self._kv.keys())
        except NoKeysError:
            return []

    async def _save(self, state: RunState) -> None:
        payload = state.model_dump_json(by_alias=True).encode()
        revision = self._revisions.get(state.run_id)
        try:
            if revision is None:
                self._revisions[state.run_id] = await self._kv.create(state.run_id, payload)
            else:
                self._revisions[state.run_id] = await self._kv.update(
                    state.run_id, payload, last=revision
                )
        except KeyWrongLastSequenceError:
            # Someone else wrote this run (an engine that restarted, say): take
            # their revision and write again; the state written came from the log.
            entry = await self._kv.get(state.run_id)
            self._revisions[state.run_id] = await self._kv.update(
                state.run_id, payload, last=entry.revision
            )
