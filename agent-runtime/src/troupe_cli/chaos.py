"""``troupe chaos run``, ``troupe chaos ls`` and ``troupe chaos show``: ChaosExperiments
through the API server (group troupe.dev, v1alpha1, plural chaosexperiments).

The pure part builds the manifest ``run`` creates (from a file, or from flags) and renders
what ``ls`` and ``show`` print; the commands at the end do the Kubernetes calls
(``kube.Kube``) in a thread. The CLI stands on the contract alone (``.importlinter``), so the
manifest is checked where the contract can check it (the runtime's ``Faults``, durations,
the label selector) and the API server's schema and CEL rules check the rest: its refusal is
printed as it is, exit 2. Everything shown of an experiment is text someone wrote into the
API server, printed through ``render.printable``.
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from troupe_cli import render
from troupe_cli.errors import CliError, Refused
from troupe_cli.kube import GROUP, VERSION, Kube
from troupe_runtime.contract.budget import LabelSelector
from troupe_runtime.contract.chaos import Faults
from troupe_runtime.contract.durations import format_duration, parse_duration

KIND = "ChaosExperiment"
API_VERSION = f"{GROUP}/{VERSION}"
GENERATE_NAME = "chaos-"
MAX_FILE_BYTES = 1024 * 1024
REASON_SHOWN = 200


# Building the manifest (pure).


def parse_selector(text: str) -> dict[str, Any]:
    """``app=x,tier=y`` as a label selector's ``matchLabels``; ``''`` selects every Agent."""
    labels: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, equals, value = part.partition("=")
        if not equals or not key.strip():
            raise Refused(f"--selector {text!r}: each term is key=value, such as app=support")
        labels[key.strip()] = value.strip()
    try:
        selector = LabelSelector(match_labels=labels)
    except ValidationError as error:
        raise Refused(f"--selector {text!r}: {_first(error)}") from error
    return {"matchLabels": selector.match_labels} if labels else {}


def _first(error: ValidationError) -> str:
    problem = error.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in problem["loc"])
    return f"{where}: {problem['msg']}" if where else str(problem["msg"])


def _call_fault(ratio: float | None, latency: str | None) -> dict[str, Any] | None:
    fault: dict[str, Any] = {}
    if ratio is not None:
        fault["errorRatio"] = ratio
    if latency is not None:
        fault["latency"] = latency
    return fault or None


def faults_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The ``spec.faults`` the fault flags ask for, checked against the runtime's contract."""
    faults: dict[str, Any] = {}
    for point, ratio, latency in (
        ("handler", args.handler_errors, args.handler_latency),
        ("model", args.model_errors, args.model_latency),
        ("tools", args.tool_errors, args.tool_latency),
    ):
        if (fault := _call_fault(ratio, latency)) is not None:
            faults[point] = fault
    messages: dict[str, Any] = {}
    if args.duplicates is not None:
        messages["duplicateRatio"] = args.duplicates
    if args.message_delay is not None:
        messages["delay"] = args.message_delay
    if messages:
        faults["messages"] = messages
    if args.drop_every is not None:
        faults["connection"] = {"dropEvery": args.drop_every}
    try:
        Faults.model_validate(faults)
    except ValidationError as error:
        raise Refused(f"the faults asked for are not valid: {_first(error)}") from error
    if args.pod_kills_every is not None:
        faults["podKills"] = {"every": _duration(args.pod_kills_every, "--pod-kills-every")}
    if not faults:
        raise Refused(
            "no fault asked for: give at least one of --handler-errors, --handler-latency, "
            "--model-errors, --model-latency, --tool-errors, --tool-latency, --duplicates, "
            "--message-delay, --drop-every, --pod-kills-every"
        )
    return faults


def _duration(text: str, flag: str) -> str:
    try:
        return format_duration(parse_duration(text))
    except ValueError as error:
        raise Refused(f"{flag} {text!r}: {error}") from error


def manifest_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The ChaosExperiment the flags describe, in ``--namespace``."""
    if args.selector is None or args.duration is None:
        raise Refused("give -f FILE, or --selector and --duration with the faults to inject")
    spec: dict[str, Any] = {
        "selector": {"agents": parse_selector(args.selector)},
        "duration": _duration(args.duration, "--duration"),
        "faults": faults_from_flags(args),
    }
    if args.min_success_ratio is not None:
        spec["steadyState"] = {"minSuccessRatio": args.min_success_ratio}
    metadata: dict[str, Any] = {"namespace": args.namespace}
    if args.name:
        metadata["name"] = args.name
    else:
        metadata["generateName"] = GENERATE_NAME
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


def manifest_from_text(text: str, namespace: str) -> dict[str, Any]:
    """The ChaosExperiment a YAML (or JSON) document holds, in its namespace or ``namespace``.

    Only the shape is checked here (one mapping, the right kind, a spec); the API server's
    schema judges the spec."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise Refused(f"the experiment file is not YAML: {str(error).splitlines()[0]}") from error
    if not isinstance(document, dict):
        raise Refused("the experiment file must hold one ChaosExperiment (a mapping)")
    kind = document.get("kind", KIND)
    api_version = document.get("apiVersion", API_VERSION)
    if kind != KIND or api_version != API_VERSION:
        raise Refused(
            f"the experiment file holds {render.printable(str(kind))} "
            f"{render.printable(str(api_version))}; it must be a {KIND} of {API_VERSION}"
        )
    metadata = document.get("metadata") or {}
    spec = document.get("spec")
    if not isinstance(metadata, dict) or not isinstance(spec, dict):
        raise Refused("the experiment file needs metadata and spec mappings")
    metadata = {**metadata, "namespace": metadata.get("namespace") or namespace}
    if not metadata.get("name") and not metadata.get("generateName"):
        metadata["generateName"] = GENERATE_NAME
    return {**document, "apiVersion": API_VERSION, "kind": KIND, "metadata": metadata}


def read_file(path: str) -> str:
    source = Path(path)
    try:
        if source.stat().st_size > MAX_FILE_BYTES:
            raise Refused(f"{path} is larger than {MAX_FILE_BYTES} bytes")
        return source.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise CliError(f"cannot read {path}: {error}") from error


# Rendering (pure).


def age(created: str | None, now: datetime) -> str:
    """How old an object is, as kubectl says it: 45s, 12m, 3h, 8d."""
    try:
        when = datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    except ValueError:
        return "?"
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "m" else 1):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _status(item: dict[str, Any]) -> dict[str, Any]:
    status = item.get("status")
    return status if isinstance(status, dict) else {}


def _spec(item: dict[str, Any]) -> dict[str, Any]:
    spec = item.get("spec")
    return spec if isinstance(spec, dict) else {}


def experiment_row(item: dict[str, Any], now: datetime) -> list[str]:
    meta = item.get("metadata") or {}
    status = _status(item)
    return [
        str(meta.get("name", "")),
        str(status.get("phase") or "Pending"),
        str(status.get("verdict") or "-"),
        str(status.get("runs") or 0),
        age(meta.get("creationTimestamp"), now),
    ]


def experiments_text(items: list[dict[str, Any]], now: datetime) -> str:
    if not items:
        return "no ChaosExperiments"
    rows = [experiment_row(item, now) for item in _sorted(items)]
    return render.table(["NAME", "PHASE", "VERDICT", "RUNS", "AGE"], rows)


def _sorted(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(items, key=lambda item: str((item.get("metadata") or {}).get("name", "")))


def selector_text(selector: Any) -> str:
    """A label selector as kubectl writes one: ``app=x,tier in (a,b)``; ``*`` for all."""
    if not isinstance(selector, dict):
        return "-"
    terms = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for requirement in selector.get("matchExpressions") or []:
        if not isinstance(requirement, dict):
            continue
        key, operator = requirement.get("key", ""), requirement.get("operator", "")
        values = ",".join(str(v) for v in requirement.get("values") or [])
        match operator:
            case "Exists":
                terms.append(str(key))
            case "DoesNotExist":
                terms.append(f"!{key}")
            case _:
                terms.append(f"{key} {str(operator).lower()} ({values})")
    return ",".join(terms) or "*"


def _percent(ratio: Any) -> str:
    return f"{float(ratio) * 100:g}%" if isinstance(ratio, int | float) else "-"


def _call_text(fault: Any) -> str:
    if not isinstance(fault, dict):
        return "?"
    parts = []
    if fault.get("latency") not in (None, "0s", "0ms"):
        share = fault.get("latencyRatio", 1)
        suffix = "" if share == 1 else f" on {_percent(share)}"
        parts.append(f"+{fault['latency']}{suffix}")
    if fault.get("errorRatio"):
        parts.append(f"{_percent(fault['errorRatio'])} errors")
    return ", ".join(parts) or "nothing"


def faults_lines(faults: Any) -> list[str]:
    """One line per fault of ``spec.faults``."""
    if not isinstance(faults, dict):
        return []
    lines = [
        f"{label}: {_call_text(faults[point])}"
        for point, label in (("handler", "handler"), ("model", "model calls"), ("tools", "tools"))
        if faults.get(point) is not None
    ]
    messages = faults.get("messages")
    if isinstance(messages, dict):
        parts = []
        if messages.get("duplicateRatio"):
            parts.append(f"{_percent(messages['duplicateRatio'])} duplicated")
        if messages.get("delay") not in (None, "0s", "0ms"):
            parts.append(f"+{messages['delay']} delay")
        lines.append(f"messages: {', '.join(parts) or 'nothing'}")
    connection = faults.get("connection")
    if isinstance(connection, dict):
        lines.append(f"connection: dropped every {connection.get('dropEvery')}")
    kills = faults.get("podKills")
    if isinstance(kills, dict):
        how = "graceful" if kills.get("graceful", True) else "forced"
        lines.append(f"pods: one killed every {kills.get('every')} ({how})")
    return lines


def figures_lines(figures: Any) -> list[str]:
    if not isinstance(figures, dict):
        return []
    sent = figures.get("probesSent", 0)
    lines = [
        f"probes: {sent} sent, {figures.get('probesAnswered', 0)} answered, "
        f"{figures.get('probesFailed', 0)} failed, {figures.get('probesLost', 0)} lost, "
        f"{figures.get('probesPending', 0)} pending",
        f"success ratio: {_percent(figures.get('successRatio'))}",
        f"p95 latency: {figures.get('p95Latency') or '-'}",
    ]
    before, after = figures.get("deadLettersBefore", 0), figures.get("deadLettersAfter", 0)
    grown = after - before if isinstance(after, int) and isinstance(before, int) else "?"
    lines.append(f"dead letters: {before} -> {after} (+{grown})")
    lines.append(f"pods killed: {figures.get('podsKilled', 0)}")
    return lines


def _when(spec: dict[str, Any]) -> str:
    when = (
        f"on {spec['schedule']} ({spec.get('timeZone', 'UTC')})" if spec.get("schedule") else "once"
    )
    return when + (" (suspended)" if spec.get("suspend") else "")


def experiment_text(item: dict[str, Any], now: datetime) -> str:
    """``troupe chaos show``: the spec in brief, the run's figures, the verdict."""
    meta = item.get("metadata") or {}
    spec, status = _spec(item), _status(item)
    selector = spec.get("selector") if isinstance(spec.get("selector"), dict) else {}
    assert isinstance(selector, dict)
    lines = [
        f"ChaosExperiment {meta.get('namespace', '')}/{meta.get('name', '')} "
        f"(age {age(meta.get('creationTimestamp'), now)})",
        f"targets: agents {selector_text(selector.get('agents'))}"
        + (
            f", workflows {selector_text(selector.get('workflows'))}"
            if selector.get("workflows") is not None
            else ""
        ),
        f"runs: {spec.get('duration', '?')} each, "
        + (
            f"on {spec['schedule']} ({spec.get('timeZone', 'UTC')})"
            if spec.get("schedule")
            else "once"
        )
        + (" (suspended)" if spec.get("suspend") else ""),
        "faults:",
        *(f"  {line}" for line in faults_lines(spec.get("faults")) or ["nothing"]),
    ]
    steady = spec.get("steadyState") if isinstance(spec.get("steadyState"), dict) else {}
    assert isinstance(steady, dict)
    wanted = [f"success ratio >= {_percent(steady.get('minSuccessRatio', 1.0))}"]
    if steady.get("maxP95Latency"):
        wanted.append(f"p95 latency <= {steady['maxP95Latency']}")
    if steady.get("maxDeadLetters") is not None:
        wanted.append(f"dead letters +{steady['maxDeadLetters']} at most")
    lines.append(f"steady state: {', '.join(wanted)}")
    phase = status.get("phase") or "Pending"
    run = f" (run {status['run']})" if status.get("run") else ""
    lines.append(f"phase: {phase}{run}")
    for field, label in (
        ("startedAt", "started"),
        ("endsAt", "faults end"),
        ("finishedAt", "finished"),
        ("nextRunAt", "next run"),
    ):
        if status.get(field):
            lines.append(f"{label}: {status[field]}")
    targets = status.get("targets")
    if isinstance(targets, dict) and (targets.get("agents") or targets.get("workflows")):
        names = [
            *(targets.get("agents") or []),
            *(f"workflow {w}" for w in targets.get("workflows") or []),
        ]
        lines.append(f"targeted: {', '.join(str(n) for n in names)}")
    figures = figures_lines(status.get("figures"))
    if figures:
        lines.append("observed:")
        lines += [f"  {line}" for line in figures]
    verdict = status.get("verdict")
    reason = str(status.get("verdictReason") or "")[:REASON_SHOWN]
    lines.append(f"verdict: {verdict or '-'}" + (f": {reason}" if verdict and reason else ""))
    return "\n".join(lines)


def created_text(item: dict[str, Any]) -> str:
    meta = item.get("metadata") or {}
    return (
        f"created ChaosExperiment {meta.get('namespace', '')}/{meta.get('name', '')}; "
        f"follow it with `troupe chaos show {meta.get('name', '')}`"
    )


# The commands (Kubernetes I/O in a thread).


def _kube(args: argparse.Namespace) -> Kube:
    return Kube(args.kubeconfig)


def _print(args: argparse.Namespace, text: str, document: Any) -> None:
    output = render.dumps(document) if args.output == "json" else render.printable(text)
    print(output, flush=True)


async def run_experiment(args: argparse.Namespace) -> int:
    """Create the ChaosExperiment of ``-f`` (or the flags); the operator runs it."""
    if args.file is not None:
        manifest = manifest_from_text(read_file(args.file), args.namespace)
    else:
        manifest = manifest_from_flags(args)
    kube = await asyncio.to_thread(_kube, args)
    namespace = str(manifest["metadata"]["namespace"])
    created = await asyncio.to_thread(kube.create_chaos_experiment, namespace, manifest)
    _print(args, created_text(created), created)
    return 0


async def list_experiments(args: argparse.Namespace) -> int:
    kube = await asyncio.to_thread(_kube, args)
    items = await asyncio.to_thread(kube.chaos_experiments, args.namespace)
    _print(args, experiments_text(items, datetime.now(UTC)), _sorted(items))
    return 0


async def show_experiment(args: argparse.Namespace) -> int:
    kube = await asyncio.to_thread(_kube, args)
    item = await asyncio.to_thread(kube.chaos_experiment, args.namespace, args.name)
    if item is None:
        raise CliError(
            f"no ChaosExperiment {args.name} in namespace {args.namespace}; "
            "list them with `troupe chaos ls`"
        )
    _print(args, experiment_text(item, datetime.now(UTC)), item)
    return 0


def add_commands(commands: Any, flags: argparse.ArgumentParser) -> None:
    """``troupe chaos run|ls|show`` on the CLI's parser."""
    group = commands.add_parser(
        "chaos", help="ChaosExperiments: inject faults into agents, see the verdict"
    ).add_subparsers(dest="chaos_command", required=True, metavar="COMMAND")

    def command(name: str, handler: Any, description: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=description, parents=[flags])
        sub.set_defaults(kube_handler=handler)
        sub.add_argument(
            "--kubeconfig",
            type=Path,
            default=None,
            help="the kubeconfig to use (default: $KUBECONFIG or ~/.kube/config)",
        )
        return sub

    run = command("run", run_experiment, "create a ChaosExperiment (from -f, or from flags)")
    run.add_argument("-f", "--file", help="a ChaosExperiment manifest (YAML or JSON)")
    run.add_argument("--name", help="the experiment's name (default: chaos-<random>)")
    run.add_argument("--selector", help="the Agents, by label: app=support,tier=front ('' for all)")
    run.add_argument("--duration", help="how long the run injects faults, such as 30s")
    ratio = _ratio
    run.add_argument("--handler-errors", type=ratio, metavar="RATIO", help="share 0..1 failing")
    run.add_argument("--handler-latency", metavar="DURATION", help="added before each handler")
    run.add_argument("--model-errors", type=ratio, metavar="RATIO", help="model calls failing")
    run.add_argument("--model-latency", metavar="DURATION", help="added to each model call")
    run.add_argument("--tool-errors", type=ratio, metavar="RATIO", help="tool calls failing")
    run.add_argument("--tool-latency", metavar="DURATION", help="added to each tool call")
    run.add_argument("--duplicates", type=ratio, metavar="RATIO", help="messages delivered twice")
    run.add_argument("--message-delay", metavar="DURATION", help="added before each message")
    run.add_argument("--drop-every", metavar="DURATION", help="drop the NATS connection")
    run.add_argument("--pod-kills-every", metavar="DURATION", help="kill one pod this often")
    run.add_argument(
        "--min-success-ratio", type=ratio, metavar="RATIO", help="steady state (default 1)"
    )
    command("ls", list_experiments, "list the namespace's ChaosExperiments")
    shown = command("show", show_experiment, "one experiment: faults, figures, verdict")
    shown.add_argument("name", metavar="NAME")


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to 1") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not from 0 to 1")
    return value
