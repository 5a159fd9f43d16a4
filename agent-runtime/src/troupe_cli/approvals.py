"""``troupe approve``, ``troupe deny`` and ``troupe approvals``: deciding what waits for a
person, through the Approval objects the operator keeps (docs/approvals.md).

A decision is a patch of the Approval's ``spec.decision`` with ``decidedBy`` set to the
caller's own user name, which the CLI learns from the API server (a SelfSubjectReview), since
the admission policy admits no other. Whether the caller may decide is the API server's to
say (RBAC, then the policy's approvers list): its refusal is printed as it is and the command
exits 2. Everything shown of an Approval is the operator's bounded text, printed through
``render.printable`` all the same.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from troupe_cli import render
from troupe_cli.errors import CliError
from troupe_cli.kube import Kube
from troupe_runtime.contract.approvals import MAX_REASON_CHARS, bounded_text

MESSAGE_SHOWN = 60


def _phase(item: dict[str, Any]) -> str:
    return str((item.get("status") or {}).get("phase") or "Pending")


def _point(spec: dict[str, Any]) -> str:
    requester = spec.get("requester") or {}
    return str(requester.get("step") or requester.get("tool") or "")


def approval_row(item: dict[str, Any], all_namespaces: bool) -> list[str]:
    """One line of ``troupe approvals``."""
    meta, spec = item.get("metadata") or {}, item.get("spec") or {}
    requester = spec.get("requester") or {}
    message = bounded_text(str(spec.get("message") or ""), MESSAGE_SHOWN)
    row = [
        str(meta.get("name", "")),
        f"{requester.get('kind', '')}/{requester.get('name', '')}",
        _point(spec),
        _phase(item),
        str(spec.get("expiresAt") or ""),
        message,
    ]
    return [str(meta.get("namespace", "")), *row] if all_namespaces else row


def approvals_text(items: list[dict[str, Any]], all_namespaces: bool) -> str:
    if not items:
        return "no approvals wait"
    header = ["NAME", "REQUESTER", "STEP/TOOL", "PHASE", "EXPIRES", "MESSAGE"]
    if all_namespaces:
        header = ["NAMESPACE", *header]
    return render.table(header, [approval_row(item, all_namespaces) for item in items])


def waiting(items: list[dict[str, Any]], everything: bool) -> list[dict[str, Any]]:
    """Pending and undecided, unless ``everything``; by namespace and name."""
    shown = [
        item
        for item in items
        if everything or (_phase(item) == "Pending" and "decision" not in (item.get("spec") or {}))
    ]
    return sorted(
        shown, key=lambda i: (i["metadata"].get("namespace", ""), i["metadata"].get("name", ""))
    )


def decision_problem(item: dict[str, Any]) -> str | None:
    """Why the Approval can no longer be decided, or None."""
    name = item["metadata"]["name"]
    decided = (item.get("spec") or {}).get("decision")
    if decided:
        return (
            f"Approval {name} is decided already: {decided.get('verdict')} by "
            f"{decided.get('decidedBy')}"
        )
    if _phase(item) != "Pending":
        return f"Approval {name} is {_phase(item)}: nothing waits for a decision"
    return None


def _kube(args: argparse.Namespace) -> Kube:
    return Kube(args.kubeconfig)


async def list_approvals(args: argparse.Namespace) -> int:
    kube = await asyncio.to_thread(_kube, args)
    namespace = None if args.all_namespaces else args.namespace
    items = waiting(await asyncio.to_thread(kube.approvals, namespace), args.all)
    if args.output == "json":
        print(render.dumps(items), flush=True)
    else:
        print(render.printable(approvals_text(items, args.all_namespaces)), flush=True)
    return 0


async def decide(args: argparse.Namespace, verdict: str) -> int:
    """Patch the decision as the caller; print what was decided."""
    kube = await asyncio.to_thread(_kube, args)
    item = await asyncio.to_thread(kube.approval, args.namespace, args.name)
    if item is None:
        raise CliError(
            f"no Approval {args.name} in namespace {args.namespace}; "
            "list what waits with `troupe approvals`"
        )
    problem = decision_problem(item)
    if problem is not None:
        raise CliError(problem)
    caller = await asyncio.to_thread(kube.caller)
    decision = {
        "verdict": verdict,
        "decidedBy": caller.user,
        "reason": bounded_text(args.reason, MAX_REASON_CHARS),
    }
    version = str(item["metadata"]["resourceVersion"])
    stored = await asyncio.to_thread(kube.decide, args.namespace, args.name, decision, version)
    document = {"name": args.name, "namespace": args.namespace, **decision}
    done = "Approved" if verdict == "Approve" else "Denied"
    recorded = (stored.get("spec") or {}).get("decision") or decision
    text = f"{done} Approval {args.namespace}/{args.name} as {recorded.get('decidedBy')}"
    print(render.dumps(document) if args.output == "json" else render.printable(text), flush=True)
    return 0


async def approve(args: argparse.Namespace) -> int:
    return await decide(args, "Approve")


async def deny(args: argparse.Namespace) -> int:
    return await decide(args, "Deny")
