"""Pure output of every command: aligned tables for people, plain JSON for scripts.

Each view has a ``*_text`` and a ``*_json`` function; the JSON forms use ISO
times and seconds so that ``-o json`` output parses without Troupe's models.
What is printed may come from anyone (a dead letter, say): ``printable`` and
``dumps`` make any of it safe to write to any terminal or pipe.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from troupe_cli.gateway import CallAnswer, CallRequest
from troupe_cli.views import (
    AgentLoad,
    BudgetView,
    DeadLetter,
    RunResult,
    StepAttempt,
    readable_data,
)
from troupe_runtime.contract import envelope
from troupe_runtime.contract.budget import Amount
from troupe_runtime.contract.durations import format_duration
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.run_state import RunState, pending_approvals
from troupe_runtime.contract.usage import Usage
from troupe_runtime.nats.kv import Change

MAX_CELL = 60
TOO_DEEP = "<nested too deeply to print>"
# Control characters (but newline and tab) would move a terminal's cursor or worse.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _encodable(text: str) -> str:
    r"""Lone surrogates (from undecodable bytes) as ``\udXXX`` escapes: valid JSON, and
    printable in any encoding."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def printable(text: str) -> str:
    """Text for a terminal: control characters and lone surrogates escaped."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", _encodable(text))


def dumps(value: Any, indent: int | None = 2) -> str:
    """JSON that always encodes (one line without ``indent``); a value nested too deeply
    to encode becomes ``TOO_DEEP``."""
    try:
        text = json.dumps(value, indent=indent, ensure_ascii=False)
    except RecursionError:
        text = json.dumps(TOO_DEEP)
    return _encodable(text)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, the header in capitals."""
    cells = [[name.upper() for name in header], *([_cell(value) for value in row] for row in rows)]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    return "\n".join(
        "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _cell(value: str) -> str:
    flat = " ".join(value.split())
    return flat if len(flat) <= MAX_CELL else flat[: MAX_CELL - 1] + "…"


def when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%SZ")


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def duration(seconds: float | None) -> str:
    """Short and exact enough to compare steps: ``12ms``, ``3.25s``, ``2m05s``, ``1h02m``."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def offset(moment: datetime | None, start: datetime) -> str:
    """A time within a run, relative to its start, so a timeline reads at a glance."""
    return "-" if moment is None else f"+{duration((moment - start).total_seconds())}"


def dollars(cost: float) -> str:
    """Enough places for a small model's fractions of a cent: ``$0.000125``, ``$1.5``."""
    return "$" + (f"{cost:.6f}".rstrip("0").rstrip(".") or "0")


def tokens(usage: Usage | None) -> str:
    return "-" if usage is None else f"{usage.tokens_in}/{usage.tokens_out}"


def cost(usage: Usage | None) -> str:
    return "-" if usage is None else dollars(usage.cost_usd)


def usage_json(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {"tokensIn": usage.tokens_in, "tokensOut": usage.tokens_out, "costUsd": usage.cost_usd}


def _run_seconds(state: RunState) -> float | None:
    if state.finished_at is None:
        return None
    return (state.finished_at - state.started_at).total_seconds()


def started_text(workflow: str, run_id: str, duplicate: bool) -> str:
    if duplicate:
        return f"run {run_id} of workflow {workflow} was already started; nothing new started"
    return f"started run {run_id} of workflow {workflow}"


def started_json(workflow: str, run_id: str, duplicate: bool) -> dict[str, Any]:
    return {"workflow": workflow, "run": run_id, "duplicate": duplicate}


def result_text(result: RunResult) -> str:
    lines = [f"run {result.run_id}: {result.status}"]
    if result.error:
        lines.append(f"error: {result.error}")
    if result.output is not None:
        lines.append(dumps(result.output))
    return "\n".join(lines)


def result_json(result: RunResult) -> dict[str, Any]:
    return {
        "run": result.run_id,
        "status": result.status,
        "output": result.output,
        "error": result.error,
    }


def call_text(request: CallRequest, answer: CallAnswer) -> str:
    """A completed call prints its output alone (text as is), so it pipes like an answer."""
    if answer.state == "completed":
        return answer.output if isinstance(answer.output, str) else dumps(answer.output)
    if answer.state in ("failed", "canceled", "rejected"):
        reason = f" ({answer.reason})" if answer.reason else ""
        why = answer.error or "no error given"
        return f"{request.kind} {request.name} {answer.state} task {answer.task_id}: {why}{reason}"
    later = f", or GET {answer.location}" if answer.location else ""
    return (
        f"task {answer.task_id} of {request.kind} {request.name} is still {answer.state} after "
        f"{request.wait:g}s; wait for it again with "
        f"`troupe call {request.kind} {request.name} --id {answer.task_id}`{later}"
    )


def call_json(answer: CallAnswer) -> dict[str, Any]:
    return answer.document()


def _waiting_on(run: RunState) -> list[str]:
    """The Approvals a run waits on (``kubectl get approval NAME``), or none."""
    return [] if run.terminal else [a.name for a in pending_approvals(run).values()]


def runs_text(runs: Sequence[RunState]) -> str:
    if not runs:
        return "no runs"
    # Token columns only where some run counted: runs of plain agents stay as narrow as ever;
    # so the approval column, only where some run waits for one.
    counted = any(run.usage is not None for run in runs)
    waiting = any(_waiting_on(run) for run in runs)
    rows = [
        [
            run.run_id,
            run.status,
            when(run.started_at),
            when(run.finished_at),
            duration(_run_seconds(run)),
            *([tokens(run.usage), cost(run.usage)] if counted else []),
            *([", ".join(_waiting_on(run))] if waiting else []),
        ]
        for run in runs
    ]
    header = ["run", "status", "started", "finished", "duration"]
    header += [*(["tokens in/out", "cost"] if counted else []), *(["approval"] if waiting else [])]
    return table(header, rows)


def runs_json(runs: Sequence[RunState]) -> list[dict[str, Any]]:
    return [
        {
            "run": run.run_id,
            "status": run.status,
            "started": iso(run.started_at),
            "finished": iso(run.finished_at),
            "durationSeconds": _run_seconds(run),
            "usage": usage_json(run.usage),
            "waitingForApprovals": _waiting_on(run),
        }
        for run in runs
    ]


def _attempt_label(attempt: StepAttempt) -> str:
    return "compensate" if attempt.attempt is None else str(attempt.attempt)


def run_text(state: RunState, attempts: Sequence[StepAttempt]) -> str:
    lines = [
        f"run:       {state.run_id}",
        f"status:    {state.status}",
        f"started:   {when(state.started_at)}",
        f"finished:  {when(state.finished_at)}",
        f"duration:  {duration(_run_seconds(state))}",
    ]
    counted = state.usage is not None or any(a.usage is not None for a in attempts)
    if counted:
        lines += [f"tokens:    {tokens(state.usage)} (in/out)", f"cost:      {cost(state.usage)}"]
    if not state.terminal:
        for step, approval in pending_approvals(state).items():
            lines += [
                f"approval:  {approval.name} (step {step}, expires {when(approval.expires_at)}); "
                f"decide with troupe approve|deny {approval.name} --reason ...",
                f"asks:      {approval.message}",
            ]
    lines.append("")
    if attempts:
        # Which agent handled each attempt, once the log says (fallbacks can change it).
        agents = any(a.agent is not None for a in attempts)
        rows = [
            [
                attempt.step,
                _attempt_label(attempt),
                *([attempt.agent or ""] if agents else []),
                attempt.status,
                offset(attempt.dispatched_at, state.started_at),
                offset(attempt.finished_at, state.started_at),
                duration(attempt.seconds),
                *([tokens(attempt.usage), cost(attempt.usage)] if counted else []),
                attempt.error or "",
            ]
            for attempt in attempts
        ]
        header = ["step", "attempt", *(["agent"] if agents else []), "status"]
        header += ["dispatched", "finished", "duration"]
        header += [*(["tokens in/out", "cost"] if counted else []), "error"]
        lines += [table(header, rows), ""]
    else:
        lines += ["no steps dispatched yet", ""]
    if state.error:
        lines.append(f"error: {state.error}")
    if state.output is not None:
        lines += ["output:", dumps(state.output)]
    return "\n".join(lines).rstrip()


def run_json(state: RunState, attempts: Sequence[StepAttempt]) -> dict[str, Any]:
    return {
        "run": state.run_id,
        "status": state.status,
        "started": iso(state.started_at),
        "finished": iso(state.finished_at),
        "durationSeconds": _run_seconds(state),
        "input": state.input,
        "output": state.output,
        "error": state.error,
        "usage": usage_json(state.usage),
        "approvals": [
            {
                "step": step,
                "name": approval.name,
                "phase": approval.phase,
                "message": approval.message,
                "expiresAt": iso(approval.expires_at),
                "approved": approval.approved,
                "decidedBy": approval.decided_by,
                "decidedAt": iso(approval.decided_at),
                "reason": approval.reason,
            }
            for step, s in state.steps.items()
            if (approval := s.approval) is not None
        ],
        "steps": [
            {
                "step": attempt.step,
                "attempt": attempt.attempt,
                "compensation": attempt.compensation,
                "agent": attempt.agent,
                "status": attempt.status,
                "dispatched": iso(attempt.dispatched_at),
                "finished": iso(attempt.finished_at),
                "durationSeconds": attempt.seconds,
                "error": attempt.error,
                "usage": usage_json(attempt.usage),
            }
            for attempt in attempts
        ],
    }


def sent_text(event_id: str, subject: str, stream: str, sequence: int) -> str:
    return f"sent {event_id} to {subject} (stream {stream}, sequence {sequence})"


def sent_json(event_id: str, subject: str, stream: str, sequence: int) -> dict[str, Any]:
    return {"id": event_id, "subject": subject, "stream": stream, "sequence": sequence}


def reply_text(agent: str, reply: CloudEvent, subject: str, sequence: int) -> str:
    """An agent's reply to ``troupe send --stream``: its outcome, tokens and data."""
    usage = Usage.from_attributes(reply.model_extra or {})
    outcome = "failed" if reply.type == envelope.ERROR_TYPE else "answered"
    lines = [f"{agent} {outcome} {reply.causationid} (sent to {subject}, sequence {sequence})"]
    if usage is not None:
        lines.append(f"tokens: {tokens(usage)} (in/out), cost {cost(usage)}")
    if reply.data is not None:
        lines.append(dumps(reply.data))
    return "\n".join(lines)


def reply_json(reply: CloudEvent) -> dict[str, Any]:
    return {
        "type": reply.type,
        "failed": reply.type == envelope.ERROR_TYPE,
        "usage": usage_json(Usage.from_attributes(reply.model_extra or {})),
        "data": reply.data
        if not isinstance(reply.data, bytes)
        else readable_data(reply.data, None),
    }


def dead_letters_text(letters: Sequence[DeadLetter]) -> str:
    if not letters:
        return "no dead letters"
    rows = [
        [
            str(letter.sequence),
            when(letter.time),
            letter.reason,
            "-" if letter.attempts is None else str(letter.attempts),
            letter.original_subject or "-",
            letter.error,
        ]
        for letter in letters
    ]
    return table(["seq", "time", "reason", "attempts", "subject", "error"], rows)


def dead_letter_json(letter: DeadLetter) -> dict[str, Any]:
    return {
        "sequence": letter.sequence,
        "time": iso(letter.time),
        "reason": letter.reason,
        "error": letter.error,
        "attempts": letter.attempts,
        "originalSubject": letter.original_subject,
        "eventId": letter.event_id,
        "headers": letter.headers,
        "data": readable_data(letter.data, letter.content_type),
    }


def dead_letters_json(letters: Sequence[DeadLetter]) -> list[dict[str, Any]]:
    return [dead_letter_json(letter) for letter in letters]


def dead_letter_text(letter: DeadLetter) -> str:
    lines = [
        f"sequence:  {letter.sequence}",
        f"time:      {when(letter.time)}",
        f"reason:    {letter.reason}",
        f"attempts:  {'-' if letter.attempts is None else letter.attempts}",
        f"subject:   {letter.original_subject or '-'}",
        f"error:     {letter.error}",
        "headers:",
        *(f"  {key}: {value}" for key, value in sorted(letter.headers.items())),
        "data:",
        dumps(readable_data(letter.data, letter.content_type)),
    ]
    return "\n".join(lines)


def loads_text(loads: Sequence[AgentLoad]) -> str:
    if not loads:
        return "no agents"
    rows = [
        [
            load.agent,
            f"{load.throughput:.1f}",
            str(load.lag),
            str(load.ack_pending),
            str(load.redelivered),
            "-" if load.dead_letters is None else str(load.dead_letters),
        ]
        for load in loads
    ]
    return table(["agent", "msg/s", "lag", "ack pending", "redelivered", "dlq"], rows)


def loads_json(loads: Sequence[AgentLoad]) -> list[dict[str, Any]]:
    return [
        {
            "agent": load.agent,
            "throughput": load.throughput,
            "lag": load.lag,
            "ackPending": load.ack_pending,
            "redelivered": load.redelivered,
            "deadLetters": load.dead_letters,
        }
        for load in loads
    ]


def value_json(bucket: str, key: str, revision: int, value: Any) -> dict[str, Any]:
    return {"bucket": bucket, "key": key, "revision": revision, "value": value}


def change_text(change: Change) -> str:
    if change.deleted:
        return f"{change.revision}  DEL  {change.key}"
    return f"{change.revision}  PUT  {change.key}  {dumps(change.value, indent=None)}"


def change_json(change: Change) -> dict[str, Any]:
    return {
        "key": change.key,
        "revision": change.revision,
        "deleted": change.deleted,
        "value": change.value,
    }


def _scope(view: BudgetView) -> str:
    definition = view.definition
    if definition.scope == "Workflow":
        return f"Workflow {definition.workflow}"
    if definition.scope == "Agents":
        return f"Agents ({', '.join(definition.agents or []) or 'none'})"
    return "Namespace"


def _window(view: BudgetView) -> str:
    window = view.definition.window
    if window.duration is not None:
        return f"{window.type} {format_duration(window.duration)}"
    return window.type


def count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _limit(value: float | None, money: bool) -> str:
    if value is None:
        return "-"
    return dollars(value) if money else count(int(value))


def _remaining_text(view: BudgetView) -> str:
    parts = [
        *([count(view.remaining_tokens)] if view.remaining_tokens is not None else []),
        *([dollars(view.remaining_cost)] if view.remaining_cost is not None else []),
    ]
    return " / ".join(parts) or "-"


def budgets_text(views: Sequence[BudgetView]) -> str:
    if not views:
        return "no budgets"
    rows = []
    for view in views:
        limits = view.definition.limits
        rows.append(
            [
                view.definition.name,
                _scope(view),
                _window(view),
                count(view.spent.tokens),
                _limit(limits.tokens.hard if limits.tokens else None, money=False),
                dollars(view.spent.cost_usd),
                _limit(limits.cost_usd.hard if limits.cost_usd else None, money=True),
                count(view.held.tokens),
                _remaining_text(view),
                str(view.refusals),
            ]
        )
    header = ["name", "scope", "window", "tokens", "hard", "cost", "hard $", "held"]
    return table([*header, "remaining", "refused"], rows)


def amount_json(amount: Amount) -> dict[str, Any]:
    return {"tokens": amount.tokens, "costUsd": amount.cost_usd}


def budget_json(view: BudgetView) -> dict[str, Any]:
    """Named as the Budget's status names them, so a script reads either alike."""
    definition = view.definition
    document: dict[str, Any] = {
        "name": definition.name,
        "generation": definition.generation,
        "scope": {
            "type": definition.scope,
            "agents": definition.agents,
            "workflow": definition.workflow,
        },
        "window": definition.window.model_dump(mode="json", by_alias=True, exclude_none=True),
        "limits": definition.limits.model_dump(mode="json", by_alias=True, exclude_none=True),
        "currentWindow": view.window,
        "windowStart": iso(view.window_start),
        "windowEnd": iso(view.window_end),
        "spent": amount_json(view.spent),
        "reserved": amount_json(view.held),
        "remaining": {"tokens": view.remaining_tokens, "costUsd": view.remaining_cost},
        "burnRate": {
            "tokensPerHour": view.burn_rate.tokens,
            "costUsdPerHour": view.burn_rate.cost_usd,
        },
        "projectedExhaustion": iso(view.projected_exhaustion),
        "refusals": view.refusals,
        "runs": None,
    }
    if view.runs is not None:
        document["runs"] = {
            "tracked": view.runs,
            "exceeded": view.runs_exceeded,
            "largest": amount_json(view.largest_run or Amount()),
        }
    return document


def budgets_json(views: Sequence[BudgetView]) -> list[dict[str, Any]]:
    return [budget_json(view) for view in views]


def budget_detail_json(view: BudgetView) -> dict[str, Any]:
    return {
        **budget_json(view),
        "windows": [
            {
                "window": figures.window,
                "started": iso(figures.started),
                "spent": amount_json(figures.spent),
                "reserved": amount_json(figures.held),
                "holds": figures.holds,
                "refusals": figures.refusals,
            }
            for figures in view.windows
        ],
    }


def budget_text(view: BudgetView) -> str:
    definition = view.definition
    limits = definition.limits
    tokens_limits = limits.tokens
    cost_limits = limits.cost_usd
    soft_tokens = tokens_limits.soft if tokens_limits else None
    hard_tokens = tokens_limits.hard if tokens_limits else None
    soft_cost = cost_limits.soft if cost_limits else None
    hard_cost = cost_limits.hard if cost_limits else None
    rate = view.burn_rate
    lines = [
        f"budget:      {definition.name}",
        f"scope:       {_scope(view)}",
        f"window:      {_window(view)}"
        + ("" if view.runs is not None else f" ({view.window}, UTC)"),
    ]
    if view.window_start is not None:
        lines.append(f"from:        {when(view.window_start)}")
    if view.window_end is not None:
        lines.append(f"until:       {when(view.window_end)}")
    lines += [
        f"limits:      tokens soft {_limit(soft_tokens, False)} hard {_limit(hard_tokens, False)}"
        f"; cost soft {_limit(soft_cost, True)} hard {_limit(hard_cost, True)}",
        f"spent:       {count(view.spent.tokens)} tokens, {dollars(view.spent.cost_usd)}",
        f"reserved:    {count(view.held.tokens)} tokens, {dollars(view.held.cost_usd)}",
        f"remaining:   {_remaining_text(view)}",
        f"burn rate:   {count(rate.tokens)} tokens/h, {dollars(rate.cost_usd)}/h",
        f"exhaustion:  {when(view.projected_exhaustion)}",
        f"refused:     {view.refusals}",
    ]
    if view.runs is not None:
        largest = view.largest_run or Amount()
        lines.append(
            f"runs:        {view.runs} tracked, {view.runs_exceeded} at or past a hard limit; "
            f"largest {count(largest.tokens)} tokens, {dollars(largest.cost_usd)}"
        )
    lines.append("")
    if view.windows:
        rows = [
            [
                figures.window,
                when(figures.started),
                count(figures.spent.tokens),
                dollars(figures.spent.cost_usd),
                count(figures.held.tokens),
                str(figures.holds),
                str(figures.refusals),
            ]
            for figures in view.windows
        ]
        header = ["run" if view.runs is not None else "window", "started", "tokens", "cost"]
        lines.append(table([*header, "held", "holds", "refused"], rows))
    else:
        lines.append("nothing spent yet")
    return "\n".join(lines)
