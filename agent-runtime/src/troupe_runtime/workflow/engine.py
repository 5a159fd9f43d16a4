"""The engine's I/O loop: triggers start runs, agent replies move them on, a
ticker enforces timeouts, retries and deadlines.

Every decision comes from ``planner.plan`` over the run's projection, and every
transition is appended to the run's log before it counts. Dispatches carry a
deterministic ``Nats-Msg-Id`` and are published before their event is logged:
after a crash the step is published again under the same id, and JetStream
drops the copy, so a step reaches its agent once. Each dispatch carries a
``deadline`` (the step's timeout or the run's deadline, whichever comes first),
past which the agent drops the attempt instead of working on for nobody, and the
``troupeworkflow`` extension (``envelope.WORKFLOW_ATTRIBUTE``): the workflow's name, which
agents carry on so a Workflow's Budget counts every call made in its runs.

A cancel (``run_events.CANCEL_TYPE`` on ``cancel.<run>``, taken with the replies) is
logged as a ``CancelRequested``; the planner then ends the run ``Cancelled`` and its
result is ``troupe.workflow.cancelled``; a cancel is not a failure, so no dead letter.

An approval step (``workflow.approvals``) files its request in the namespace's approvals
bucket after logging ``ApprovalRequested``, and the run waits at no cost. Decisions (an
``approvals.ApprovalDecision`` CloudEvent of ``approvals.DECISION_TYPE`` on
``approve.<run>``, taken with the replies) are checked hard: a malformed one, one naming no
waiting request, or one for a run not waiting is logged and acked, nothing else. A decision
is logged as ``ApprovalDecided`` (once: its key) before the request is written back with
its final phase; the request's expiry logs the timeout's decision the same way, and a run
that ends with a request pending withdraws it before its end is logged. The bucket is
derived from the log, so recovery writes every request of a run again where it differs.

A step with fallback agents (``planner``) logs each hand-over as a ``StepFellBack``
before the next agent's dispatch: the attempt counter runs on across the step's agents, so
every dispatch id (and its ``Nats-Msg-Id``) is new, and an engine that crashes between the
two resumes with the right agent and publishes its dispatch once. A step's outcome is
recorded with the agent the engine dispatched that attempt to, never the one a reply
names.

A run a Budget stopped (a step's failure reply says reason ``budget-exceeded``) ends
``BudgetExceeded``: its result is ``troupe.workflow.budgetexceeded`` on the results
subject, with the finished steps' outputs, and it goes to the workflow's dead letters
like a failed run (with ``Troupe-Dead-Letter-Reason: budget-exceeded``).

Only the engine holding the workflow's lease (``lease``) works: it pulls, ticks
and acks, and the server refuses the log appends of any other. A message an engine
handled without owning the runs is NAKed, never acked, so the owner gets it. Every
loop is guarded: a failure is logged and the run is tried again a little later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from troupe_runtime.contract import approvals, envelope, naming
from troupe_runtime.contract.dead_letters import (
    ERROR_HEADER,
    REASON_HEADER,
    DeadLetterReason,
    header_safe,
)
from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.contract.envelope import (
    ERROR_TYPE,
    CloudEvent,
    MalformedMessage,
    child_traceparent,
)
from troupe_runtime.contract.run_events import (
    BUDGET_EXCEEDED_REASON,
    CANCEL_TYPE,
    COMPENSATE,
    RUN_ID_PATTERN,
    ApprovalRequested,
    CancelRequested,
    CompensationDispatched,
    CompensationFinished,
    Event,
    MalformedCancel,
    RunFinished,
    RunStarted,
    StepDispatched,
    StepFailed,
    StepFellBack,
    StepSucceeded,
    cancel_reason,
    dispatch_id,
    parse_dispatch_id,
)
from troupe_runtime.contract.run_state import RunState, pending_approvals
from troupe_runtime.contract.usage import Usage
from troupe_runtime.nats.pull import Puller
from troupe_runtime.workflow import approvals as approval_steps
from troupe_runtime.workflow import planner
from troupe_runtime.workflow.lease import Lease, LeaseLost
from troupe_runtime.workflow.runlog import RunLog

logger = logging.getLogger(__name__)

TICK_SECONDS = 0.05
PULL_WAIT_SECONDS = 1.0
REPLY_BATCH = 256
RETRY_SECONDS = 1.0
"""How soon a run whose planning or acting failed is tried again, and a failed
ownership period started over."""
LEASE_CHECK_SECONDS = 1.0
LEASE_RENEW_SECONDS = 3600.0
STEP_EVENT_TYPE = "troupe.workflow.step"
MAX_ATTEMPT_DIGITS = 9


def reply_event(event: CloudEvent, now: datetime) -> Event | None:
    """Turn an agent's reply into the run event it stands for (None if unrelated), with
    the tokens and cost its usage attributes report (``Usage.from_attributes``)."""
    parsed = parse_dispatch_id(event.causationid or "")
    if parsed is None:
        return None
    run_id, step, attempt = parsed
    error = _error_text(event) if event.type == ERROR_TYPE else None
    usage = Usage.from_attributes(event.model_extra or {})
    if attempt == COMPENSATE:
        return CompensationFinished(run_id=run_id, at=now, step=step, error=error, usage=usage)
    if not (attempt.isascii() and attempt.isdecimal()) or len(attempt) > MAX_ATTEMPT_DIGITS:
        return None  # anyone may reply: "²" is a digit to str.isdigit, not to int()
    if error is not None:
        return StepFailed(
            run_id=run_id,
            at=now,
            step=step,
            attempt=int(attempt),
            error=error,
            usage=usage,
            reason=_reason(event),
        )
    return StepSucceeded(
        run_id=run_id, at=now, step=step, attempt=int(attempt), output=event.data, usage=usage
    )


def _reason(event: CloudEvent) -> str | None:
    """The failure's reason, if it is one the engine acts on; anyone may reply, so any
    other value is ignored rather than recorded."""
    data = event.data
    if isinstance(data, dict) and data.get("reason") == BUDGET_EXCEEDED_REASON:
        return BUDGET_EXCEEDED_REASON
    return None


def _error_text(event: CloudEvent) -> str:
    if isinstance(event.data, dict) and "error" in event.data:
        return str(event.data["error"])
    return str(event.data)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Engine:
    """Runs one workflow until ``stop()``, while it owns the workflow's runs."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        log: RunLog,
        lease: Lease,
        config: EngineConfig,
        clock: Callable[[], datetime] = utcnow,
        approvals_kv: KeyValue | None = None,
    ) -> None:
        self._nc = nc
        self._approvals = approvals_kv
        self._js = js
        self._log = log
        self._lease = lease
        self._config = config
        self._clock = clock
        self._source = f"/{config.namespace}/workflows/{config.workflow}"
        self._runs: dict[str, RunState] = {}
        self._wake: dict[str, datetime] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._unfiled: dict[str, set[str]] = {}
        """Approval steps whose request the bucket may not hold as the log has it (a write
        failed): filed again before the run is next planned."""
        self._stop = asyncio.Event()
        self._halt = asyncio.Event()
        self._capacity = asyncio.Event()
        # Rounds of planning one call to _advance may take: each round changes the
        # run, so a DAG needs a few per step; more means a bug, not progress.
        self._advance_rounds = 4 * len(config.steps) + 16
        self.ready = False

    @property
    def active_runs(self) -> int:
        return len(self._runs)

    def stop(self) -> None:
        self._stop.set()
        self._halt.set()
        self._capacity.set()

    def _step_down(self) -> None:
        """Another engine owns the runs now: stop working, keep nothing."""
        if not self._halt.is_set():
            logger.warning("engine %s no longer owns the runs; stepping down", self._lease.holder)
        self._halt.set()
        self._capacity.set()

    @property
    def _owning(self) -> bool:
        return self._lease.held and not self._halt.is_set()

    async def run(self) -> None:
        """Wait for the lease, work while it is ours; contend again after losing it."""
        while not self._stop.is_set():
            try:
                if not await self._lease.acquire(self._stop.is_set):
                    return
                self._halt = asyncio.Event()
                if self._stop.is_set():
                    return
                await self._own()
            except LeaseLost as lost:
                logger.warning("%s", lost)
            except Exception:
                logger.exception("the engine failed; starting over in %ss", RETRY_SECONDS)
                await self._stopped_within(RETRY_SECONDS)
            finally:
                self.ready = False
                self._runs.clear()
                self._wake.clear()
                self._locks.clear()
                self._unfiled.clear()
                await self._lease.release()

    async def _own(self) -> None:
        await self._recover()
        triggers = Puller(self._nc, self._config.stream, naming.TRIGGERS_CONSUMER)
        replies = Puller(self._nc, self._config.stream, naming.REPLIES_CONSUMER)
        await triggers.start()
        await replies.start()
        self.ready = True
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pump(triggers, self._on_trigger, self._free_slots))
                group.create_task(self._pump(replies, self._on_reply, lambda: REPLY_BATCH))
                group.create_task(self._tick())
                group.create_task(self._keep_lease())
        finally:
            self.ready = False
            await triggers.stop()
            await replies.stop()

    async def _keep_lease(self) -> None:
        """Notice a lost lease soon, and renew ours before the stream's max age drops it."""
        loop = asyncio.get_running_loop()
        renew_every = min(LEASE_RENEW_SECONDS, self._config.retention.max_age.total_seconds() / 4)
        renewed = loop.time()
        while not self._halt.is_set():
            await self._halted_within(LEASE_CHECK_SECONDS)
            if self._halt.is_set():
                return
            try:
                if loop.time() - renewed >= renew_every:
                    await self._lease.renew()
                    renewed = loop.time()
                else:
                    await self._lease.confirm()
            except LeaseLost:
                self._step_down()
            except Exception:
                logger.exception("checking the lease failed; trying again")

    async def _recover(self) -> None:
        """Rebuild every unfinished run from its log (the active markers name them),
        then carry it on; finished runs are never read."""
        for run_id in await self._log.active_run_ids():
            try:
                state = await self._log.rebuild(run_id)
            except LeaseLost:
                raise
            except Exception:
                logger.exception("run %s: its log cannot be replayed; left as it is", run_id)
                continue
            if state is None:
                await self._log.forget_active(run_id)  # marked, then crashed before logging
                continue
            self._runs[run_id] = state
            if not state.terminal:
                logger.info("resuming run %s", run_id)
                await self._file_all(state)
        for run_id in list(self._runs):
            await self._advance_safely(run_id)

    def _free_slots(self) -> int:
        return max(self._config.max_concurrent_runs - len(self._runs), 0)

    async def _pump(
        self, puller: Puller, handle: Callable[[Msg], Any], room: Callable[[], int]
    ) -> None:
        while not self._halt.is_set():
            batch = room()
            if batch == 0:
                self._capacity.clear()
                await self._capacity.wait()
                continue
            try:
                # What is there now, in one batch; when idle, wait for the first to come.
                messages = await puller.pull(batch) or await puller.pull(1, PULL_WAIT_SECONDS)
            except Exception:
                logger.exception("pulling failed; trying again")
                await self._halted_within(PULL_WAIT_SECONDS)
                continue
            await asyncio.gather(*(self._settle(handle, msg) for msg in messages))

    async def _settle(self, handle: Callable[[Msg], Any], msg: Msg) -> None:
        """Ack only what this engine handled as the owner; NAK anything else."""
        try:
            await handle(msg)
        except LeaseLost:
            self._step_down()
            await _nak(msg, 0.0)
            return
        except Exception:
            logger.exception("handling %s failed; it will be redelivered", msg.subject)
            await _nak(msg, RETRY_SECONDS)
            return
        if not self._owning:
            await _nak(msg, 0.0)  # the owner gets it
            return
        try:
            await msg.ack()
        except Exception:
            # Redelivered after ackWait, and handled again idempotently.
            logger.warning("acking %s failed; it will be redelivered", msg.subject, exc_info=True)

    async def _stopped_within(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _halted_within(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._halt.wait(), seconds)

    async def _tick(self) -> None:
        while not self._halt.is_set():
            await self._halted_within(TICK_SECONDS)
            now = self._clock()
            due = [run_id for run_id, at in self._wake.items() if at <= now]
            for run_id in due:
                if self._halt.is_set():
                    return
                try:
                    await self._advance_safely(run_id)
                except LeaseLost:
                    self._step_down()

    async def _on_trigger(self, msg: Msg) -> None:
        try:
            event = envelope.parse(msg.headers, msg.data)
        except MalformedMessage as error:
            await self._dead_letter(msg.data, f"malformed trigger: {error.reason}", "invalid")
            return
        run_id = event.id
        if not RUN_ID_PATTERN.match(run_id):
            await self._dead_letter(
                msg.data, f"event id {run_id!r} is not a valid run id", "invalid"
            )
            return
        if run_id in self._runs:
            return  # the same trigger again, for a run in progress
        async with self._lock(run_id):
            state = await self._start(run_id, event)
            if state.terminal:
                return  # the same trigger again, for a run that finished
            self._runs[run_id] = state
        await self._advance_safely(run_id)

    async def _start(self, run_id: str, trigger: CloudEvent) -> RunState:
        """The run's state: new, or rebuilt when the log has it already (a trigger sent
        again, or a crash that left the run half-started)."""
        existing = await self._log.rebuild(run_id)
        if existing is not None:
            return existing
        await self._log.mark_active(run_id)
        started = RunStarted(
            run_id=run_id,
            at=self._clock(),
            input=trigger.data,
            priority=trigger.priority,
            traceparent=trigger.traceparent,
        )
        return await self._log.append(None, started)

    async def _on_reply(self, msg: Msg) -> None:
        if msg.subject.startswith(self._config.subject("cancel", "")):
            await self._on_cancel(msg)
            return
        if msg.subject.startswith(self._config.subject("approve", "")):
            await self._on_decision(msg)
            return
        try:
            event = envelope.parse(msg.headers, msg.data)
        except MalformedMessage as error:
            logger.warning("dropping a malformed reply on %s: %s", msg.subject, error.reason)
            return
        transition = reply_event(event, self._clock())
        if transition is None or not RUN_ID_PATTERN.match(transition.run_id):
            return
        if transition.run_id not in self._runs and not await self._adopt(transition.run_id):
            return  # a late reply, for a run that finished or never was
        await self._record(transition)
        await self._advance_safely(transition.run_id)

    async def _on_cancel(self, msg: Msg) -> None:
        """Log the cancel, then let the planner end the run ``Cancelled``. A malformed
        cancel, or one for a run that finished or never was, is dropped (and acked)."""
        run_id = msg.subject.removeprefix(self._config.subject("cancel", ""))
        if not RUN_ID_PATTERN.match(run_id):
            logger.warning("dropping a cancel for an invalid run id")
            return
        try:
            event = envelope.parse(msg.headers, msg.data)
            if event.type != CANCEL_TYPE:
                raise MalformedCancel(f"type is not {CANCEL_TYPE}")
            reason = cancel_reason(event.data)
        except (MalformedMessage, MalformedCancel) as error:
            detail = error.reason if isinstance(error, MalformedMessage) else str(error)
            logger.warning("dropping a malformed cancel of run %s: %s", run_id, detail)
            return
        if run_id not in self._runs and not await self._adopt(run_id):
            logger.info("cancel of run %s: finished or unknown; nothing to do", run_id)
            return
        async with self._lock(run_id):
            state = self._runs.get(run_id)
            if state is None or state.terminal or state.cancellation is not None:
                return  # cancelled already: twice is once
            self._runs[run_id] = await self._log.append(
                state, CancelRequested(run_id=run_id, at=self._clock(), reason=reason)
            )
        logger.info("run %s: cancelled", run_id)
        await self._advance_safely(run_id)

    async def _on_decision(self, msg: Msg) -> None:
        """Log a person's decision and write the request back decided, then move the run
        on. Anything that is not a well-formed decision of a request the run waits for is
        dropped (and acked): a decision relayed twice is taken once."""
        run_id = msg.subject.removeprefix(self._config.subject("approve", ""))
        if not RUN_ID_PATTERN.match(run_id):
            logger.warning("dropping an approval decision for an invalid run id")
            return
        try:
            event = envelope.parse(msg.headers, msg.data)
            if event.type != approvals.DECISION_TYPE:
                raise ValueError(f"type is not {approvals.DECISION_TYPE}")
            decision = approvals.ApprovalDecision.model_validate(event.data)
        except MalformedMessage as error:
            logger.warning("dropping a malformed decision for run %s: %s", run_id, error.reason)
            return
        except (ValueError, ValidationError) as error:
            detail = str(error).splitlines()[0]
            logger.warning("dropping a malformed decision for run %s: %s", run_id, detail)
            return
        if run_id not in self._runs and not await self._adopt(run_id):
            logger.info("decision for run %s: finished or unknown; dropped", run_id)
            return
        async with self._lock(run_id):
            state = self._runs.get(run_id)
            problem = approval_steps.decision_problem(state, decision)
            if problem is not None or state is None:
                logger.warning("dropping a decision for run %s: %s", run_id, problem)
                return
            step = approval_steps.waiting_step(state, decision.name)
            assert step is not None
            decided = approval_steps.decided_event(state, step, decision, self._clock())
            state = await self._log.append(state, decided)
            self._runs[run_id] = state
            try:
                await self._file(state, step)
            except Exception:
                # Logged is decided: the run goes on, and the write is tried again first.
                logger.exception("run %s: writing approval %s failed", run_id, decision.name)
        logger.info(
            "run %s: approval %s %s by %s", run_id, decision.name, decided.phase, decided.decided_by
        )
        await self._advance_safely(run_id)

    def _approvals_kv(self) -> KeyValue:
        if self._approvals is None:
            raise RuntimeError("an approval step, but the engine has no approvals bucket")
        return self._approvals

    async def _put_request(self, request: approvals.ApprovalRequest) -> None:
        """Write ``request`` to the bucket unless it holds exactly that already, or holds
        it resolved while ``request`` is Pending: a filing never goes back to Pending (a
        run withdrawn just before a crash is rebuilt waiting, then ends again)."""
        kv = self._approvals_kv()
        key = naming.approval_key(request.name)
        payload = request.model_dump_json(by_alias=True).encode()
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            entry = None
        stored = entry.value if entry is not None else None
        if stored == payload or (request.pending and _resolved(stored, request)):
            return
        await kv.put(key, payload)

    async def _file(self, state: RunState, step: str) -> None:
        """The step's request in the bucket, as the log has it; one that fails is filed
        again before the run is next planned (``_refile``)."""
        request = approval_steps.request_for(self._config, state, step)
        if request is None:
            return
        unfiled = self._unfiled.setdefault(state.run_id, set())
        unfiled.add(step)
        await self._put_request(request)
        unfiled.discard(step)
        if not unfiled:
            self._unfiled.pop(state.run_id, None)

    async def _refile(self, run_id: str) -> None:
        """File again what failed to be: a failure is logged, never holds the run up (the
        log has the decision), and is retried at the next planning (``_advance`` keeps a
        wake for it)."""
        state = self._runs.get(run_id)
        for step in sorted(self._unfiled.get(run_id, ())):
            if state is None:
                return
            try:
                await self._file(state, step)
            except Exception:
                logger.warning("run %s: filing approval step %s failed again", run_id, step)

    async def _file_all(self, state: RunState) -> None:
        """Every request of a run, as its log has them: what a crash between an approval's
        event and its write left behind is written now."""
        for name, step in state.steps.items():
            if step.approval is not None:
                await self._file(state, name)

    async def _withdraw(self, state: RunState) -> None:
        """A run that ends: the requests it still waits on are withdrawn."""
        for step in pending_approvals(state):
            request = approval_steps.request_for(self._config, state, step)
            if request is not None:
                await self._put_request(approval_steps.withdrawn(request, self._clock()))

    async def _adopt(self, run_id: str) -> bool:
        """Take on an unfinished run this engine does not hold (its log says it is one
        of ours); False for a finished or unknown run."""
        async with self._lock(run_id):
            if run_id in self._runs:
                return True
            projected = await self._log.projected(run_id)
            if projected is not None and projected.terminal:
                return False
            state = await self._log.rebuild(run_id)
            if state is None or state.terminal:
                return False
            logger.info("adopting run %s from its log", run_id)
            self._runs[run_id] = state
            await self._file_all(state)
            return True

    def _lock(self, run_id: str) -> asyncio.Lock:
        return self._locks.setdefault(run_id, asyncio.Lock())

    async def _record(self, event: Event) -> None:
        async with self._lock(event.run_id):
            state = self._runs.get(event.run_id)
            if state is None:
                return
            self._runs[event.run_id] = await self._log.append(state, _attributed(state, event))

    async def _advance_safely(self, run_id: str) -> None:
        """``_advance``, with a failure logged and the run tried again a little later."""
        try:
            await self._advance(run_id)
        except LeaseLost:
            raise
        except Exception:
            logger.exception("run %s: acting failed; trying again in %ss", run_id, RETRY_SECONDS)
            if run_id in self._runs:
                self._wake[run_id] = self._clock() + timedelta(seconds=RETRY_SECONDS)

    async def _advance(self, run_id: str) -> None:
        """Plan and act until the run waits for something, for a bounded number of rounds."""
        await self._refile(run_id)
        for _ in range(self._advance_rounds):
            state = self._runs.get(run_id)
            if state is None:
                return
            if state.terminal:
                await self._log.finished(state)
                self._forget(run_id)
                return
            result = planner.plan(self._config, state, self._clock())
            wake_at = result.wake_at
            if run_id in self._unfiled:
                retry_at = self._clock() + timedelta(seconds=RETRY_SECONDS)
                wake_at = retry_at if wake_at is None else min(wake_at, retry_at)
            if wake_at is None:
                self._wake.pop(run_id, None)
            else:
                self._wake[run_id] = wake_at
            if not result.actions:
                return
            for action in result.actions:
                await self._act(run_id, action)
        logger.error(
            "run %s: still planning after %d rounds; trying again in %ss",
            run_id,
            self._advance_rounds,
            RETRY_SECONDS,
        )
        self._wake[run_id] = self._clock() + timedelta(seconds=RETRY_SECONDS)

    async def _act(self, run_id: str, action: planner.Action) -> None:
        now = self._clock()
        match action:
            case planner.Dispatch(step, attempt, payload, fallback):
                run = self._runs[run_id]
                target = self._config.step_subject(step, run.priority, fallback)
                agent = self._config.step(step).agents[fallback].agent
                deadline = planner.attempt_deadline(self._config, run, step, now)
                await self._send(target, dispatch_id(run_id, step, attempt), run, payload, deadline)
                await self._record(
                    StepDispatched(
                        run_id=run_id,
                        at=now,
                        step=step,
                        attempt=attempt,
                        input=payload,
                        agent=agent,
                    )
                )
            case planner.FallBack(step, attempt, fallback, from_agent, to_agent, error):
                await self._record(
                    StepFellBack(
                        run_id=run_id,
                        at=now,
                        step=step,
                        attempt=attempt,
                        fallback=fallback,
                        from_agent=from_agent,
                        to_agent=to_agent,
                        error=error,
                    )
                )
                logger.info(
                    "run %s: step %s falls back from %s to %s", run_id, step, from_agent, to_agent
                )
            case planner.Compensate(step, payload):
                compensation = self._config.step(step).compensation
                assert compensation is not None
                await self._send(
                    compensation.subject,
                    dispatch_id(run_id, step, COMPENSATE),
                    self._runs[run_id],
                    payload,
                )
                await self._record(
                    CompensationDispatched(run_id=run_id, at=now, step=step, input=payload)
                )
            case planner.FailStep(step, attempt, error):
                await self._record(
                    StepFailed(run_id=run_id, at=now, step=step, attempt=attempt, error=error)
                )
            case planner.RequestApproval(step, name, message, expires_at):
                await self._record(
                    ApprovalRequested(
                        run_id=run_id,
                        at=now,
                        step=step,
                        name=name,
                        message=message,
                        expires_at=expires_at,
                    )
                )
                await self._file(self._runs[run_id], step)
                logger.info("run %s: step %s waits for approval %s", run_id, step, name)
            case planner.ExpireApproval(step, approved, reason):
                run = self._runs[run_id]
                approval = run.steps[step].approval
                assert approval is not None
                await self._record(
                    approval_steps.timed_out_event(run, step, approval, approved, reason, now)
                )
                await self._file(self._runs[run_id], step)
            case planner.Finish(status, output, error):
                # Pending approvals are withdrawn first, so whoever sees the outcome sees
                # them withdrawn. The outcome is published before it is logged, like a
                # dispatch: a crash in between publishes it again under the same id, and
                # only once.
                await self._withdraw(self._runs[run_id])
                await self._publish_outcome(run_id, status, output, error)
                await self._record(
                    RunFinished(run_id=run_id, at=now, status=status, output=output, error=error)
                )

    async def _send(
        self,
        subject: str,
        event_id: str,
        run: RunState,
        data: Any,
        deadline: datetime | None = None,
    ) -> None:
        """A step's event: one trace and one priority for the whole run."""
        extensions: dict[str, Any] = {envelope.WORKFLOW_ATTRIBUTE: self._config.workflow}
        event = CloudEvent(
            id=event_id,
            source=self._source,
            type=STEP_EVENT_TYPE,
            time=self._clock(),
            datacontenttype=envelope.JSON_CONTENT_TYPE,
            correlationid=run.run_id,
            causationid=run.run_id,
            priority=run.priority,
            traceparent=child_traceparent(run.traceparent),
            replyto=self._config.subject("replies", run.run_id),
            deadline=deadline,
            data=data,
            **extensions,
        )
        headers, payload = envelope.to_binary(event)
        await self._js.publish(subject, payload, headers={**headers, Header.MSG_ID.value: event_id})

    def _forget(self, run_id: str) -> None:
        self._runs.pop(run_id, None)
        self._unfiled.pop(run_id, None)
        self._wake.pop(run_id, None)
        self._locks.pop(run_id, None)
        self._capacity.set()

    async def _publish_outcome(
        self, run_id: str, status: str, output: Any, error: str | None
    ) -> None:
        """The run's result on its results subject; a run that failed or that a Budget
        stopped also to dead letters (the latter saying reason ``budget-exceeded``)."""
        result = CloudEvent(
            id=f"{run_id}/result",
            source=self._source,
            type=f"troupe.workflow.{status.lower()}",
            time=self._clock(),
            datacontenttype=envelope.JSON_CONTENT_TYPE,
            correlationid=run_id,
            data={"status": status, "output": output, "error": error},
        )
        headers, payload = envelope.to_binary(result)
        await self._js.publish(
            self._config.subject("results", run_id),
            payload,
            headers={**headers, Header.MSG_ID.value: result.id},
        )
        if status in ("Failed", "BudgetExceeded"):
            failed = {**headers, Header.MSG_ID.value: f"{run_id}/failed"}
            if status == "BudgetExceeded":
                failed[REASON_HEADER] = DeadLetterReason.BUDGET_EXCEEDED.value
            await self._dead_letter(payload, error or "run failed", run_id, failed)

    async def _dead_letter(
        self, payload: bytes, reason: str, run_id: str, headers: dict[str, str] | None = None
    ) -> None:
        if not self._config.dead_letter.enabled:
            logger.warning("dropping (dead letters disabled): %s", reason)
            return
        await self._js.publish(
            self._config.subject("failed", run_id),
            payload,
            headers={**(headers or {}), ERROR_HEADER: header_safe(reason)},
        )


def _attributed(state: RunState, event: Event) -> Event:
    """A step's outcome with the agent its attempt was dispatched to, when the run awaits
    that attempt (else the outcome changes nothing anyway)."""
    if not isinstance(event, StepSucceeded | StepFailed) or event.agent is not None:
        return event
    current = state.steps.get(event.step)
    if current is None or current.attempt != event.attempt or current.agent is None:
        return event
    return event.model_copy(update={"agent": current.agent})


def _resolved(stored: bytes | None, request: approvals.ApprovalRequest) -> bool:
    """Whether ``stored`` is ``request`` (the same filing: its ``requested_at``) already
    resolved. Anything that does not parse is not (anyone who may write the bucket may
    write there), so the engine's own replaces it; nor is a filing of a run with the same
    id started anew."""
    if stored is None:
        return False
    try:
        found = approvals.ApprovalRequest.model_validate_json(stored)
    except ValueError:
        return False
    return not found.pending and found.requested_at == request.requested_at


async def _nak(msg: Msg, delay: float) -> None:
    try:
        await msg.nak(delay=delay or None)
    except Exception:
        logger.warning("NAKing %s failed; it comes back after ackWait", msg.subject)
