"""A run's event log (the truth) and its projection in KV (for fast reads).

Events are appended with their deterministic key as ``Nats-Msg-Id``: an engine
that repeats a transition after a crash is de-duplicated by JetStream, and the
state it gets back is rebuilt from the log, so memory and log always agree. Every
append is fenced by the engine's lease (``lease``): an engine that lost the runs
cannot write to their logs. The projection is written with revision checks and
only ever moves forward (more events), so a late writer cannot roll it back.

Beside the logs, the stream keeps two indexes the engine maintains so nothing reads
every run: ``active.<run>`` marks each unfinished run (recovery reads only those),
and ``tally.<status>`` holds one message per finished run, in finish order (the
operator's counts, and the order ``retention.maxRuns`` prunes in).
"""

from __future__ import annotations

import json
import logging

from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.contract.run_events import Event, encode_event
from troupe_runtime.contract.run_state import TERMINAL_STATUSES, RunState, apply, replay
from troupe_runtime.nats.streams import first_message, read_events, subject_counts
from troupe_runtime.workflow.lease import Lease, fenced_retry

logger = logging.getLogger(__name__)

FINISHED_STATUSES = TERMINAL_STATUSES
RUN_SUBJECT_KINDS = ("start", "events", "replies", "results", "active", "approve")
SAVE_ATTEMPTS = 5
PRUNE_BATCH = 16
"""Finished runs pruned at most per finish, so catching up after lowering maxRuns is
spread over the runs that follow instead of stalling one."""


class RunLog:
    def __init__(
        self, js: JetStreamContext, kv: KeyValue, config: EngineConfig, lease: Lease
    ) -> None:
        self._js = js
        self._kv = kv
        self._config = config
        self._lease = lease
        self._revisions: dict[str, int] = {}

    async def append(self, state: RunState | None, event: Event) -> RunState:
        """Append ``event`` and return the run's new state; if the log had it already
        (a retry after a failed save, or another engine's write), the state is rebuilt
        from the log."""
        ack = await fenced_retry(
            self._lease,
            lambda: self._js.publish(
                self._config.subject("events", event.run_id),
                encode_event(event),
                stream=self._config.stream,
                headers={Header.MSG_ID.value: event.key, **self._lease.fence()},
            ),
        )
        if ack.duplicate:
            rebuilt = await self.rebuild(event.run_id)
            if rebuilt is None:
                raise RuntimeError(f"run {event.run_id}: the log refused {event.key} but is empty")
            return rebuilt
        new_state = apply(state, event)
        await self._save(new_state)
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

    async def mark_active(self, run_id: str) -> None:
        """Index the run as unfinished, before its first event: a crash in between leaves
        a marker without a log, which recovery drops."""
        await self._publish(
            self._config.subject("active", run_id),
            json.dumps({"run": run_id}).encode(),
            f"{run_id}:active",
        )

    async def active_run_ids(self) -> list[str]:
        """The runs marked unfinished, from the subject index: none of the finished ones."""
        prefix = self._config.subject("active", "")
        counts = await subject_counts(self._js, self._config.stream, self._config.subject("active"))
        return sorted(subject.removeprefix(prefix) for subject in counts)

    async def finished(self, state: RunState) -> None:
        """Count a finished run, drop its active marker, and prune past ``maxRuns``."""
        await self._publish(
            self._config.tally_subject(state.status),
            json.dumps({"run": state.run_id}).encode(),
            f"{state.run_id}:tally",
        )
        await self.forget_active(state.run_id)
        self._revisions.pop(state.run_id, None)  # a finished run is not written again
        if self._config.retention.max_runs is not None:
            await self._prune(self._config.retention.max_runs)

    async def forget_active(self, run_id: str) -> None:
        await self._js.purge_stream(
            self._config.stream, subject=self._config.subject("active", run_id)
        )

    async def _prune(self, max_runs: int) -> None:
        """Remove the oldest finished runs past ``max_runs``: their messages and projection."""
        tallies = [self._config.tally_subject(status) for status in FINISHED_STATUSES]
        counts = await subject_counts(self._js, self._config.stream, self._config.subject("tally"))
        excess = min(sum(counts.get(t, 0) for t in tallies) - max_runs, PRUNE_BATCH)
        for _ in range(max(excess, 0)):
            firsts = [
                found
                for t in tallies
                if (found := await first_message(self._js, self._config.stream, t))
            ]
            if not firsts:
                return
            seq, data = min(firsts)
            run_id = _run_named(data)
            if run_id:
                for kind in RUN_SUBJECT_KINDS:
                    await self._js.purge_stream(
                        self._config.stream, subject=self._config.subject(kind, run_id)
                    )
                await self._kv.purge(run_id)
            await self._js.delete_msg(self._config.stream, seq)

    async def _publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        await fenced_retry(
            self._lease,
            lambda: self._js.publish(
                subject,
                payload,
                stream=self._config.stream,
                headers={Header.MSG_ID.value: msg_id, **self._lease.fence()},
            ),
        )

    async def _save(self, state: RunState) -> None:
        """Write the projection; on a conflict, only if ours is newer (more events)."""
        payload = state.model_dump_json(by_alias=True).encode()
        for _ in range(SAVE_ATTEMPTS):
            revision = self._revisions.get(state.run_id)
            try:
                if revision is None:
                    self._revisions[state.run_id] = await self._kv.create(state.run_id, payload)
                else:
                    self._revisions[state.run_id] = await self._kv.update(
                        state.run_id, payload, last=revision
                    )
                return
            except KeyWrongLastSequenceError:
                # Someone else wrote this run (an engine before us, or our own earlier
                # write whose answer was lost): keep theirs unless ours is newer.
                stored = await self.projected(state.run_id)
                if stored is not None and stored.events >= state.events:
                    return
        raise RuntimeError(f"run {state.run_id}: its projection kept changing under the engine")


def _run_named(data: bytes) -> str:
    """The run id a tally message names; "" for anything else (any client can publish there)."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return ""
    run_id = body.get("run") if isinstance(body, dict) else None
    return run_id if isinstance(run_id, str) else ""
