"""``troupe``: the command line. Parses arguments, calls ``nats_ops``, prints ``render``'s output.

Exit codes: 0 when the command did what was asked, 1 when it failed (a
``CliError``, a failed run, a replay that failed), 2 for a usage error or a call the gateway
refused, 3 for a ``troupe call`` still working when its wait ended.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from troupe_cli import approvals, chaos, render
from troupe_cli.deltas import (
    Chunk,
    Shown,
    StepStreams,
    StreamLayout,
    chunk_json,
    parse_chunk,
)
from troupe_cli.errors import CliError, Refused
from troupe_cli.gateway import DEFAULT_GATEWAY_URL, DEFAULT_TIMEOUT, CallRequest
from troupe_cli.gateway import call as call_gateway
from troupe_cli.nats_ops import HEARD_QUEUE, Heard, Ops, connected
from troupe_cli.views import (
    BudgetRecords,
    BudgetView,
    RunResult,
    agent_loads,
    budget_records,
    budget_view,
    timeline,
)
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.run_events import RUN_ID_PATTERN, decode_event
from troupe_runtime.contract.run_state import replay

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
CLEAR_SCREEN = "\x1b[H\x1b[J"
CLI_CALLER = "troupe-cli"
"""Who ``send --stream`` calls an agent as: the reply subject's caller token."""
DRAIN_SECONDS = 0.2
"""After the end, how long a message the server already sent may take to reach the queue."""
HOLD_SECONDS = 1.0
"""How long ``run --stream`` holds a stream's deltas waiting for the run's log to name its
step (the engine logs a dispatch just after sending it)."""

Command = Callable[[Ops, argparse.Namespace], Awaitable[int]]
GatewayCommand = Callable[[argparse.Namespace], Awaitable[int]]


def _emit(args: argparse.Namespace, text: str, document: Any) -> None:
    """Print for people or for scripts; either is safe whatever the data holds."""
    print(render.dumps(document) if args.output == "json" else render.printable(text), flush=True)


def _emit_line(args: argparse.Namespace, text: str, document: Any) -> None:
    """One line per item, for commands that stream: JSON Lines under ``-o json``."""
    line = render.dumps(document, indent=None) if args.output == "json" else render.printable(text)
    print(line, flush=True)


def _error(message: object) -> None:
    print(f"error: {render.printable(str(message))}", file=sys.stderr)


def _warn(message: object) -> None:
    print(f"warning: {render.printable(str(message))}", file=sys.stderr)


def parse_json(text: str, what: str) -> Any:
    """``text`` as strict JSON: NaN and Infinity, which Python would accept, are refused."""
    try:
        return json.loads(text, parse_constant=envelope.refuse_json_constant)
    except (ValueError, RecursionError) as error:
        raise CliError(
            f"{what} is not JSON ({error}); quote text as a JSON string, e.g. '\"hello\"'"
        ) from error


def _run_input(args: argparse.Namespace) -> Any:
    if args.input_file is not None:
        source = "standard input" if args.input_file == "-" else args.input_file
        try:
            text = sys.stdin.read() if args.input_file == "-" else Path(source).read_text()
        except OSError as error:
            raise CliError(f"cannot read the run input from {source}: {error}") from error
        return parse_json(text, f"the run input in {source}")
    return None if args.input is None else parse_json(args.input, "--input")


async def run_workflow(ops: Ops, args: argparse.Namespace) -> int:
    run_id = args.id or uuid.uuid4().hex
    if not RUN_ID_PATTERN.match(run_id):
        raise CliError(
            f"run id {run_id!r} is not valid: use 1 to 200 letters, digits, '-', '_' or '='"
        )
    data = _run_input(args)
    if args.stream:
        return await _run_streaming(ops, args, run_id, data)
    duplicate = await ops.start_run(args.workflow, run_id, data, args.priority)
    if not args.wait:
        _emit(
            args,
            render.started_text(args.workflow, run_id, duplicate),
            render.started_json(args.workflow, run_id, duplicate),
        )
        return 0
    result = await ops.wait_result(args.workflow, run_id, args.timeout)
    return _result(args, run_id, result)


def _result(args: argparse.Namespace, run_id: str, result: RunResult | None) -> int:
    """Print the run's result; after a stream, as one more JSON line under ``-o json``."""
    if result is None:
        raise CliError(
            f"run {run_id} of workflow {args.workflow} has no result after {args.timeout:g}s; "
            f"follow it with `troupe runs show {args.workflow} {run_id}`"
        )
    emit = _emit_line if args.stream else _emit
    emit(args, render.result_text(result), render.result_json(result))
    return 0 if result.succeeded else 1


class _Streamed:
    """Prints stream chunks as they come: text laid out, or one JSON line each."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._json = args.output == "json"
        self._layout = StreamLayout()
        self.ignored = 0

    def show(self, data: bytes, label: str | None = None) -> Chunk | None:
        chunk = parse_chunk(data)
        if chunk is None:
            self.ignored += 1
            return None
        if self._json:
            print(render.dumps(chunk_json(chunk, label), indent=None), flush=True)
        else:
            print(self._layout.text(chunk, label), end="", flush=True)
        return chunk

    def close(self) -> None:
        if not self._json:
            print(self._layout.end_line(), end="", flush=True)
        if self.ignored:
            _warn(f"ignored {self.ignored} stream messages that were not deltas")


async def _drain(ops: Ops, heard: asyncio.Queue[Heard]) -> list[Heard]:
    """What the server sent before now and is still on its way to the queue; at most
    ``HEARD_QUEUE`` messages, so a publisher that never stops cannot keep the CLI here."""
    await ops.caught_up()
    late: list[Heard] = []
    while len(late) < HEARD_QUEUE:
        try:
            late.append(await asyncio.wait_for(heard.get(), DRAIN_SECONDS))
        except TimeoutError:
            break
    return late


async def _run_streaming(ops: Ops, args: argparse.Namespace, run_id: str, data: Any) -> int:
    """Listen to every answer of the run, and to its log, before starting it; print the
    deltas named by step (``StepStreams``), then the result: ``--stream`` implies ``--wait``."""
    streamed = _Streamed(args)
    steps = StepStreams(ops.namespace, run_id, HOLD_SECONDS)
    loop = asyncio.get_running_loop()
    subjects = {
        "stream": naming.token_stream_wildcard(ops.namespace, run_id),
        "log": naming.workflow_subject(ops.namespace, args.workflow, "events", run_id),
    }

    def show(shown: list[Shown]) -> None:
        for label, data in shown:
            streamed.show(data, label)

    def take(message: Heard) -> None:
        if message.tag == "stream":
            show(steps.take(message.subject, message.data, loop.time()))
            return
        # Anyone may publish on a run's log subject; the engine's appends decode.
        with contextlib.suppress(ValueError):
            show(steps.learn(decode_event(message.data)))

    async with ops.listening(subjects) as heard:
        await ops.start_run(args.workflow, run_id, data, args.priority)
        for event in await ops.run_events(args.workflow, run_id):  # a run already going
            show(steps.learn(event))
        result = asyncio.create_task(ops.wait_result(args.workflow, run_id, args.timeout))
        try:
            while not result.done():
                expiry = steps.next_expiry()
                message = asyncio.ensure_future(heard.get())
                await asyncio.wait(
                    {message, result},
                    timeout=None if expiry is None else max(expiry - loop.time(), 0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if message.done():
                    take(message.result())
                else:
                    message.cancel()
                show(steps.expired(loop.time()))
            for late in await _drain(ops, heard):
                take(late)
            show(steps.release_all())
            outcome = await result
        finally:
            result.cancel()
    streamed.close()
    return _result(args, run_id, outcome)


def _call_input(args: argparse.Namespace) -> Any:
    if args.data_file is not None:
        source = "standard input" if args.data_file == "-" else args.data_file
        try:
            text = sys.stdin.read() if args.data_file == "-" else Path(source).read_text()
        except OSError as error:
            raise Refused(f"cannot read the call's input from {source}: {error}") from error
        return parse_json(text, f"the input in {source}")
    return None if args.data is None else parse_json(args.data, "--data")


def _credentials(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """A flag wins over the environment; the other kind from the environment is then
    dropped, so ``--api-key`` works with ``TROUPE_TOKEN`` set. An empty one (``--token ""``)
    is none: the call goes without credentials, and the gateway says what it wants."""
    if args.token is not None or args.api_key is not None:
        return args.token or None, args.api_key or None
    return os.environ.get("TROUPE_TOKEN") or None, os.environ.get("TROUPE_API_KEY") or None


async def call_target(args: argparse.Namespace) -> int:
    """POST the input to the gateway and wait; 0 completed, 1 failed, 3 still working."""
    try:
        data = _call_input(args)
    except CliError as error:
        raise Refused(str(error)) from error
    token, api_key = _credentials(args)
    request = CallRequest(
        gateway=args.gateway,
        namespace=args.namespace,
        kind=args.kind,
        name=args.name,
        data=data,
        timeout=args.timeout,
        token=token,
        api_key=api_key,
        task_id=args.id or uuid.uuid4().hex,
        session=args.session,
    )
    answer = await call_gateway(request)
    _emit(args, render.call_text(request, answer), render.call_json(answer))
    return answer.exit_code


async def list_runs(ops: Ops, args: argparse.Namespace) -> int:
    runs = await ops.runs(args.workflow)
    _emit(args, render.runs_text(runs), render.runs_json(runs))
    return 0


async def show_run(ops: Ops, args: argparse.Namespace) -> int:
    """The log is the truth: the state is replayed from it, the KV projection is a fallback."""
    events = await ops.run_events(args.workflow, args.run)
    state = replay(events) or await ops.run_projection(args.workflow, args.run)
    if state is None:
        raise CliError(
            f"workflow {args.workflow} has no run {args.run}: "
            f"list runs with `troupe runs list {args.workflow}`"
        )
    attempts = timeline(events)
    _emit(args, render.run_text(state, attempts), render.run_json(state, attempts))
    return 0


async def cancel_run(ops: Ops, args: argparse.Namespace) -> int:
    if not RUN_ID_PATTERN.match(args.run):
        raise CliError(f"run id {args.run!r} is not valid")
    await ops.cancel_run(args.workflow, args.run, args.reason)
    _emit(
        args,
        f"cancel of run {args.run} sent; see `troupe runs show {args.workflow} {args.run}`",
        {"workflow": args.workflow, "run": args.run, "cancelRequested": True},
    )
    return 0


async def send(ops: Ops, args: argparse.Namespace) -> int:
    data = None if args.data is None else parse_json(args.data, "--data")
    event_id = args.id or uuid.uuid4().hex
    if args.session is not None and not re.fullmatch(envelope.SESSION_ID_PATTERN, args.session):
        raise CliError(
            f"session {args.session!r} is not valid: use 1 to 200 letters, digits, '-', '_' or '='"
        )
    event = CloudEvent(
        id=event_id,
        source="/troupe-cli",
        type=args.type,
        datacontenttype=envelope.JSON_CONTENT_TYPE,
        priority=args.priority,
        # With --stream the CLI waits for the answer: the agent replies as to an agent's
        # tool call, on the namespace's event log, where the reply is stored.
        replyto=naming.agent_call_reply_subject(ops.namespace, CLI_CALLER, event_id)
        if args.stream
        else None,
        sessionid=args.session,
        data=data,
    )
    if args.stream:
        return await _send_streaming(ops, args, event)
    subject, stream, sequence = await ops.send(args.agent, event, args.priority)
    _emit(
        args,
        render.sent_text(event.id, subject, stream, sequence),
        render.sent_json(event.id, subject, stream, sequence),
    )
    return 0


async def _send_streaming(ops: Ops, args: argparse.Namespace, event: CloudEvent) -> int:
    """Listen to the answer's token stream and to the reply subject before sending; print
    the deltas as they come, then the reply (the agent's answer, or its failure: exit 1).
    Every handled message gets a reply, an agent that does not stream included."""
    assert event.replyto is not None
    streamed = _Streamed(args)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.timeout
    subjects = {
        "stream": naming.token_stream_subject(ops.namespace, event.run_id, event.id),
        "reply": event.replyto,
    }
    async with ops.listening(subjects) as heard:
        subject, stream, sequence = await ops.send(args.agent, event, args.priority)
        reply: CloudEvent | None = None
        while reply is None:
            try:
                message = await asyncio.wait_for(heard.get(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise CliError(
                    f"agent {args.agent} did not answer {event.id} within {args.timeout:g}s; "
                    f"look for it with `troupe dlq list {args.agent}`"
                ) from None
            if message.tag == "stream":
                streamed.show(message.data)
            else:
                reply = _reply_to(event, message)
        for late in await _drain(ops, heard):
            if late.tag == "stream":
                streamed.show(late.data)
    streamed.close()
    failed = reply.type == envelope.ERROR_TYPE
    _emit_line(
        args,
        render.reply_text(args.agent, reply, subject, sequence),
        {
            **render.sent_json(event.id, subject, stream, sequence),
            "reply": render.reply_json(reply),
        },
    )
    return 1 if failed else 0


def _reply_to(event: CloudEvent, message: Heard) -> CloudEvent | None:
    """The agent's reply to ``event``; None for anything else on the reply subject."""
    try:
        reply = envelope.parse(message.headers, message.data)
    except envelope.MalformedMessage:
        return None
    return reply if reply.causationid == event.id else None


async def list_dead_letters(ops: Ops, args: argparse.Namespace) -> int:
    letters = await ops.dead_letters(args.agent, args.limit)
    _emit(args, render.dead_letters_text(letters), render.dead_letters_json(letters))
    return 0


async def show_dead_letter(ops: Ops, args: argparse.Namespace) -> int:
    letter = await ops.dead_letter(args.agent, args.seq)
    _emit(args, render.dead_letter_text(letter), render.dead_letter_json(letter))
    return 0


async def replay_dead_letters(ops: Ops, args: argparse.Namespace) -> int:
    """Replays each letter on its own: one that fails is reported, the others still go."""
    if args.all == bool(args.seqs):
        raise CliError("name the dead letters to replay by sequence, or pass --all (not both)")
    sequences = await ops.dead_letter_sequences(args.agent) if args.all else args.seqs
    replayed, failed = [], []
    for sequence in sequences:
        try:
            subject = await ops.replay(args.agent, sequence)
        except CliError as error:
            _error(error)
            failed.append(sequence)
            continue
        replayed.append({"sequence": sequence, "subject": subject})
    text = "\n".join(f"replayed {r['sequence']} to {r['subject']}" for r in replayed)
    _emit(args, text or "nothing replayed", {"replayed": replayed, "failed": failed})
    return 1 if failed else 0


async def purge_dead_letters(ops: Ops, args: argparse.Namespace) -> int:
    purged = await ops.purge_dead_letters(args.agent)
    _emit(
        args,
        f"purged {purged} dead letters of agent {args.agent}",
        {"agent": args.agent, "purged": purged},
    )
    return 0


def _budget_views(records: BudgetRecords) -> list[BudgetView]:
    """Every budget's figures now; a key whose value does not read is warned of, once."""
    if records.unreadable:
        _warn(f"skipped unreadable budget entries: {', '.join(records.unreadable)}")
    now = time.time()
    return [
        budget_view(definition, records.ledgers.get(name, {}), now)
        for name, definition in sorted(records.definitions.items())
    ]


async def list_budgets(ops: Ops, args: argparse.Namespace) -> int:
    views = _budget_views(budget_records(await ops.budget_entries()))
    _emit(args, render.budgets_text(views), render.budgets_json(views))
    return 0


async def show_budget(ops: Ops, args: argparse.Namespace) -> int:
    """The current window's figures, then the windows (or runs) kept, newest (or largest)
    first, at most ``--limit`` of them."""
    records = budget_records(await ops.budget_definition(args.name))
    views = [view for view in _budget_views(records) if view.definition.name == args.name]
    if not views:
        raise CliError(
            f"the definition of Budget {args.name} in namespace {ops.namespace} does not read; "
            f"inspect it with `troupe budget ls -o json`"
        )
    view = dataclasses.replace(views[0], windows=views[0].windows[: args.limit])
    _emit(args, render.budget_text(view), render.budget_detail_json(view))
    return 0


async def get_state(ops: Ops, args: argparse.Namespace) -> int:
    entry = await ops.get(args.bucket, args.key)
    _emit(
        args,
        render.dumps(entry.value),
        render.value_json(args.bucket, args.key, entry.revision, entry.value),
    )
    return 0


async def put_state(ops: Ops, args: argparse.Namespace) -> int:
    value = parse_json(args.value, f"the value for {args.bucket}/{args.key}")
    revision = await (await ops.bucket(args.bucket)).put(args.key, value)
    _emit(
        args,
        f"put {args.bucket}/{args.key} at revision {revision}",
        render.value_json(args.bucket, args.key, revision, value),
    )
    return 0


async def watch_state(ops: Ops, args: argparse.Namespace) -> int:
    """Current values first, then every change, until ``--count`` changes or Ctrl-C."""
    seen = 0
    async with (await ops.bucket(args.bucket)).watch(args.pattern) as changes:
        async for change in changes:
            _emit_line(args, render.change_text(change), render.change_json(change))
            seen += 1
            if seen == args.count:
                break
    return 0


async def top(ops: Ops, args: argparse.Namespace) -> int:
    """Two samples ``--interval`` apart make one table; without ``--once``, repeat."""
    loop = asyncio.get_running_loop()
    before, at = await ops.sample_agents(), loop.time()
    while True:
        await asyncio.sleep(args.interval)
        after, now = await ops.sample_agents(), loop.time()
        loads = agent_loads(before, after, now - at)
        if args.once:
            _emit(args, render.loads_text(loads), render.loads_json(loads))
            return 0
        if args.output == "text" and sys.stdout.isatty():
            print(CLEAR_SCREEN, end="")
        _emit_line(args, render.loads_text(loads), render.loads_json(loads))
        before, at = after, now


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of seconds")
    return number


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(value)
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return number

    return parse


def _global_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    parser.add_argument(
        "--nats-url",
        default=defaults.get("nats_url", argparse.SUPPRESS),
        help="NATS server (default: $NATS_URL or nats://127.0.0.1:4222)",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        default=defaults.get("namespace", argparse.SUPPRESS),
        help="Kubernetes namespace (default: default)",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=["text", "json"],
        default=defaults.get("output", argparse.SUPPRESS),
        help="text for people (default), json for scripts",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="troupe", description="Drive and inspect Troupe workflows, agents and state."
    )
    _global_flags(
        parser,
        {
            "nats_url": os.environ.get("NATS_URL", DEFAULT_NATS_URL),
            "namespace": "default",
            "output": "text",
        },
    )
    # The same flags after the command (``troupe runs list wf -o json``) override these.
    flags = argparse.ArgumentParser(add_help=False)
    _global_flags(flags, {})
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        group: Any, name: str, handler: Command, description: str
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=description, parents=[flags])
        sub.set_defaults(handler=handler)
        return sub

    run = command(commands, "run", run_workflow, "start a workflow run")
    run.add_argument("workflow")
    given = run.add_mutually_exclusive_group()
    given.add_argument("--input", help="the run's input, as JSON")
    given.add_argument("--input-file", help="a file holding the input JSON ('-': stdin)")
    run.add_argument("--id", help="the run id (default: a new one); the same id never runs twice")
    run.add_argument("--wait", action="store_true", help="wait for the result and print it")
    run.add_argument(
        "--priority",
        type=_at_least(0),
        default=None,
        help="the run's priority: its steps go to their agents' inbox of that level",
    )
    run.add_argument(
        "--stream",
        action="store_true",
        help="print the LLM agents' answers as they stream, by step, then the result (waits)",
    )
    run.add_argument("--timeout", type=_positive, default=300.0, help="seconds --wait waits")

    runs = commands.add_parser("runs", help="list and inspect runs").add_subparsers(
        dest="runs_command", required=True, metavar="COMMAND"
    )
    command(runs, "list", list_runs, "list a workflow's runs").add_argument("workflow")
    show = command(runs, "show", show_run, "show a run's step timeline")
    show.add_argument("workflow")
    show.add_argument("run")
    cancelled = command(runs, "cancel", cancel_run, "cancel a run: it ends Cancelled")
    cancelled.add_argument("workflow")
    cancelled.add_argument("run")
    cancelled.add_argument("--reason", help="why (recorded as the run's error)")

    send_ = command(commands, "send", send, "send a message to an agent")
    send_.add_argument("agent")
    send_.add_argument("--data", help="the message data, as JSON")
    send_.add_argument(
        "--priority", type=_at_least(0), default=0, help="0 (the default) is the lowest"
    )
    send_.add_argument("--type", default="troupe.cli.message", help="the CloudEvent type")
    send_.add_argument("--id", help="the CloudEvent id (default: a new one)")
    send_.add_argument(
        "--session",
        help="the session (sessionid) the message belongs to: an LLM agent with "
        "spec.llm.session remembers the session's earlier messages",
    )
    send_.add_argument(
        "--stream", action="store_true", help="print the LLM agent's answer as it streams"
    )
    send_.add_argument(
        "--timeout", type=_positive, default=300.0, help="seconds --stream waits for the answer"
    )

    dlq = commands.add_parser("dlq", help="an agent's dead letters").add_subparsers(
        dest="dlq_command", required=True, metavar="COMMAND"
    )
    listing = command(dlq, "list", list_dead_letters, "list dead letters, oldest first")
    listing.add_argument("agent")
    listing.add_argument("--limit", type=_at_least(1), default=100)
    shown = command(dlq, "show", show_dead_letter, "show one dead letter")
    shown.add_argument("agent")
    shown.add_argument("seq", type=int)
    replays = command(dlq, "replay", replay_dead_letters, "send dead letters back, then delete")
    replays.add_argument("agent")
    replays.add_argument("seqs", type=int, nargs="*", metavar="SEQ")
    replays.add_argument("--all", action="store_true")
    command(dlq, "purge", purge_dead_letters, "delete all dead letters").add_argument("agent")

    state = commands.add_parser("state", help="shared state buckets").add_subparsers(
        dest="state_command", required=True, metavar="COMMAND"
    )
    get = command(state, "get", get_state, "print a key's value")
    get.add_argument("bucket")
    get.add_argument("key")
    put = command(state, "put", put_state, "set a key to a JSON value")
    put.add_argument("bucket")
    put.add_argument("key")
    put.add_argument("value", metavar="JSON")
    watch = command(state, "watch", watch_state, "print values, then every change")
    watch.add_argument("bucket")
    watch.add_argument("pattern", nargs="?", default=">", metavar="KEY_PATTERN")
    watch.add_argument("--count", type=_at_least(1), help="stop after this many")

    budgets = commands.add_parser(
        "budget", help="token and cost budgets: spent, reserved, remaining"
    ).add_subparsers(dest="budget_command", required=True, metavar="COMMAND")
    command(budgets, "ls", list_budgets, "list the namespace's budgets and their current window")
    shown_budget = command(budgets, "show", show_budget, "one budget, with its windows or runs")
    shown_budget.add_argument("name")
    shown_budget.add_argument(
        "--limit", type=_at_least(1), default=20, help="windows (or runs) to list at most"
    )

    calls = commands.add_parser(
        "call", help="call an agent or a workflow through the gateway and wait for its answer"
    ).add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind in ("agent", "workflow"):
        article = "an" if kind == "agent" else "a"
        called = calls.add_parser(kind, help=f"call {article} {kind}", parents=[flags])
        called.set_defaults(gateway_handler=call_target)
        called.add_argument("name", metavar="NAME")
        given_data = called.add_mutually_exclusive_group()
        given_data.add_argument("--data", help="the input, as JSON (default: null)")
        given_data.add_argument("--data-file", help="a file holding the input JSON ('-': stdin)")
        called.add_argument(
            "--gateway",
            default=os.environ.get("TROUPE_GATEWAY_URL", DEFAULT_GATEWAY_URL),
            help=f"the gateway's URL (default: $TROUPE_GATEWAY_URL or {DEFAULT_GATEWAY_URL})",
        )
        credentials = called.add_mutually_exclusive_group()
        credentials.add_argument("--token", help="a bearer token (default: $TROUPE_TOKEN)")
        credentials.add_argument("--api-key", help="an API key (default: $TROUPE_API_KEY)")
        called.add_argument(
            "--timeout",
            type=_positive,
            default=DEFAULT_TIMEOUT,
            help="seconds to wait for the answer (at most 300; default 30)",
        )
        called.add_argument(
            "--id", help="the task id (Idempotency-Key); the same id again is the same task"
        )
        called.add_argument(
            "--session",
            help="the context id (A2A contextId) the call belongs to: an LLM agent with "
            "spec.llm.session remembers the context's earlier calls",
        )

    def kube_command(name: str, handler: GatewayCommand, description: str) -> Any:
        sub = commands.add_parser(name, help=description, parents=[flags])
        sub.set_defaults(kube_handler=handler)
        sub.add_argument(
            "--kubeconfig",
            type=Path,
            default=None,
            help="the kubeconfig to decide with (default: $KUBECONFIG or ~/.kube/config)",
        )
        return sub

    for name, handler, verb in (
        ("approve", approvals.approve, "approve"),
        ("deny", approvals.deny, "deny"),
    ):
        decided = kube_command(name, handler, f"{verb} an Approval that waits, as yourself")
        decided.add_argument("name", metavar="NAME", help="the Approval (troupe approvals)")
        decided.add_argument("--reason", required=True, help="why, for the run's log")
    listed = kube_command("approvals", approvals.list_approvals, "list the Approvals that wait")
    listed.add_argument("-A", "--all-namespaces", action="store_true", help="in every namespace")
    listed.add_argument("--all", action="store_true", help="decided and resolved ones too")

    chaos.add_commands(commands, flags)

    top_ = command(commands, "top", top, "throughput, lag and errors per agent")
    top_.add_argument("--interval", type=_positive, default=2.0, help="seconds between samples")
    top_.add_argument("--once", action="store_true", help="print one table and exit")
    return parser


async def amain(argv: Sequence[str] | None = None) -> int:
    """The CLI inside a running event loop (tests run it beside an engine)."""
    args = build_parser().parse_args(argv)
    try:
        gateway_handler: GatewayCommand | None = getattr(args, "gateway_handler", None)
        if gateway_handler is not None:  # the gateway's commands need no NATS
            return await gateway_handler(args)
        kube_handler: GatewayCommand | None = getattr(args, "kube_handler", None)
        if kube_handler is not None:  # nor do the approvals', which talk to Kubernetes
            return await kube_handler(args)
        async with connected(args.nats_url, args.namespace) as ops:
            code: int = await args.handler(ops, args)
            return code
    except CliError as error:
        _error(error)
        return error.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        # A terminal or pipe that cannot encode a character shows it escaped, not a traceback.
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        return asyncio.run(amain(argv))
    except KeyboardInterrupt:
        return 0
