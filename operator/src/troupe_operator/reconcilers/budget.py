"""Budgets: a pass resolves the selector, writes the definition the runtimes enforce, reads
the window's ledger into status and prunes the ledgers of ended windows.

A Budget owns no Kubernetes object: what it leads to is in the namespace's budget bucket on
the operator's NATS (``TROUPE_NATS_URL``): ``def.<budget>``, written only when it changed, and
the ledgers the runtimes write. Level-based like every pass: the same Agents and the same
ledger give the same status, so an idle pass writes nothing. The pass runs on create, update
and resume, and every ``budget_refresh_seconds`` for every Budget (``refresh_forever``): that
is how spending reaches status and how a selector follows the Agents' labels (the Agents'
own events do not wake a Budget). A change of SoftLimitExceeded or HardLimitExceeded is an
Event. Deleting a Budget purges its definition and ledgers; while NATS cannot be reached the
deletion is retried, then given up (``handlers``), never blocked for good.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from troupe_operator import metrics
from troupe_operator.api import BudgetSpec, BudgetStatus
from troupe_operator.builders import spending
from troupe_operator.builders import status as status_builders
from troupe_operator.clients.nats import BudgetRead, MessagingUnavailable, NatsTarget
from troupe_operator.reconcilers.common import (
    Operator,
    Written,
    regarding,
    spec_problems,
    write_status,
)
from troupe_runtime.contract import naming
from troupe_runtime.contract.budget import BudgetDefinition, Ledger
from troupe_runtime.contract.redact import redact

KIND = "Budget"
PLURAL = "budgets"
AGENTS = "agents"
REFRESH_CONCURRENCY = 16
SWEEP_EVERY = 6
"""Refreshes between sweeps for orphaned definitions (a minute by default)."""
logger = logging.getLogger(__name__)


def target(operator: Operator) -> NatsTarget:
    """Budgets live on the operator's own NATS, with its own credentials."""
    return NatsTarget(operator.settings.nats_url, replicas=operator.settings.nats_replicas)


async def announce(operator: Operator, written: Written | None) -> None:
    """An Event for each condition the write changed; the limits' Warnings included."""
    if written is None:
        return
    previous = BudgetStatus.model_validate(written.previous).conditions
    current = BudgetStatus.model_validate(written.current).conditions
    for change in spending.budget_transitions(previous, current):
        await operator.kube.create_event(
            regarding(KIND, written.body),
            "Warning" if change.warning else "Normal",
            change.reason,
            f"{change.type}={change.status}: {change.message}",
        )


async def _write(
    operator: Operator,
    namespace: str,
    name: str,
    next_status: Any,
) -> None:
    async def compute(body: dict[str, Any]) -> BudgetStatus:
        previous = BudgetStatus.model_validate(body.get("status") or {})
        new: BudgetStatus = next_status(previous, datetime.now(UTC))
        conditions = status_builders.keep_transition_times(previous.conditions, new.conditions)
        return new.model_copy(update={"conditions": conditions})

    written = await write_status(operator.kube, PLURAL, namespace, name, compute)
    await announce(operator, written)


async def budget_pass(operator: Operator, body: Mapping[str, Any]) -> str | None:
    """One pass over one Budget; returns what blocks it (NATS unreachable), for the caller
    to retry with backoff, or None.

    The Budget is read again under its lock: one whose deletion began while the pass waited
    (its cleanup holds the same lock) must not have its definition written back."""
    meta = body["metadata"]
    namespace, name = str(meta["namespace"]), str(meta["name"])
    async with operator.lock(KIND, namespace, name):
        fresh = await operator.kube.read_custom(PLURAL, namespace, name)
        if fresh is None or "deletionTimestamp" in fresh["metadata"]:
            return None
        generation = int(fresh["metadata"].get("generation") or 1)
        raw_spec = fresh.get("spec") or {}
        with metrics.reconcile_timer(KIND):
            return await _budget_pass(operator, namespace, name, generation, raw_spec)


async def _budget_pass(
    operator: Operator, namespace: str, name: str, generation: int, raw_spec: Mapping[str, Any]
) -> str | None:
    try:
        spec = BudgetSpec.model_validate(raw_spec)
    except ValidationError as error:
        # The stored definition stays: the runtimes keep enforcing the last valid spec.
        said = "; ".join(p.sentence() for p in spec_problems(error, raw_spec))
        await _write(
            operator,
            namespace,
            name,
            lambda previous, now: spending.spec_invalid_status(previous, generation, now, said),
        )
        return None
    agents = None
    if spec.scope.agents is not None:
        listed = await operator.kube.list_custom(AGENTS, namespace)
        agents = spending.resolve_agents(spec.scope.agents, listed)
    wanted = spending.definition(name, generation, spec, agents)
    try:
        return await _converge(operator, namespace, name, generation, wanted)
    except Exception as error:
        message = redact(f"{type(error).__name__}: {error}")
        logger.exception("%s %s/%s: the pass failed", KIND, namespace, name)
        failed = status_builders.reconcile_failed(spending.MESSAGING_READY, message)
        await _write(
            operator,
            namespace,
            name,
            lambda previous, now: spending.failed_status(previous, generation, now, failed),
        )
        return f"the pass failed: {message}"


async def _converge(
    operator: Operator,
    namespace: str,
    name: str,
    generation: int,
    wanted: BudgetDefinition,
) -> str | None:
    """Definition, ledgers, status, pruning: the pass once the spec is read."""
    nats = target(operator)
    messaging = spending.Messaging(naming.budget_bucket(namespace), redact(nats.url))
    clock = datetime.now(UTC).timestamp()
    read: BudgetRead | None = None
    try:
        read = await operator.nats.sync_budget(
            nats,
            namespace,
            wanted,
            spending.encode_definition(wanted),
            lambda stored: spending.definition_stale(stored, wanted),
            lambda windows: spending.to_read(wanted, windows, clock),
        )
    except MessagingUnavailable as error:
        messaging = spending.Messaging(messaging.bucket, messaging.url, redact(str(error)))
    found = None
    parsed: dict[str, Ledger] = {}
    if read is not None:
        parsed, junk = spending.parse_ledgers(read.values)
        found = spending.figures(wanted, parsed, clock, junk)
        metrics.set_budget(namespace, name, spending.gauges(found))
        if read.written:
            logger.info("Budget %s/%s: definition written (%s)", namespace, name, wanted.scope)
        if junk:
            logger.warning("Budget %s/%s: unreadable ledgers %s", namespace, name, junk)
    await _write(
        operator,
        namespace,
        name,
        lambda previous, now: spending.budget_status(
            previous, generation, now, wanted, messaging, found
        ),
    )
    if read is not None:
        pruned = spending.to_prune(wanted, read.windows, parsed, clock)
        if pruned:
            try:
                await operator.nats.prune_ledgers(nats, namespace, name, pruned)
            except MessagingUnavailable as error:
                logger.warning("Budget %s/%s: pruning failed: %s", namespace, name, error)
            else:
                logger.info("Budget %s/%s: pruned ledgers %s", namespace, name, pruned)
    if messaging.error is not None:
        return f"NATS unavailable: {messaging.error}"
    return None


async def delete_budget(operator: Operator, namespace: str, name: str) -> list[str]:
    """Purge the Budget's definition and ledgers; ``MessagingUnavailable`` while NATS cannot
    be reached. Serialised with its passes, so none writes the definition back."""
    async with operator.lock(KIND, namespace, name):
        removed = await operator.nats.delete_budget(target(operator), namespace, name)
    if not await budgets_staying(operator, namespace, leaving=name) and not await _llm_staying(
        operator, namespace
    ):
        bucket = naming.kv_stream(naming.budget_bucket(namespace))
        removed += await operator.nats.delete_streams(target(operator), [bucket])
    metrics.forget_budget(namespace, name)
    return removed


def _staying(obj: Mapping[str, Any]) -> bool:
    """Not being deleted, or deleted with deletionPolicy Retain."""
    spec = obj.get("spec") or {}
    retained = isinstance(spec, dict) and spec.get("deletionPolicy") == "Retain"
    return "deletionTimestamp" not in obj.get("metadata", {}) or retained


async def budgets_staying(operator: Operator, namespace: str, leaving: str = "") -> bool:
    """Whether a Budget other than ``leaving`` stays in ``namespace``: the budget bucket
    must then stay too."""
    return any(
        _staying(other) and other["metadata"]["name"] != leaving
        for other in await operator.kube.list_custom(PLURAL, namespace)
    )


async def _llm_staying(operator: Operator, namespace: str) -> bool:
    """Whether an LLM agent (any Agent with ``spec.llm``, whatever else its spec says) stays
    in ``namespace``: its runtime watches the budget bucket."""
    return any(
        _staying(agent) and isinstance(agent.get("spec"), dict) and "llm" in agent["spec"]
        for agent in await operator.kube.list_custom("agents", namespace)
    )


def leftovers(namespace: str, name: str) -> list[str]:
    """What a given-up deletion leaves in NATS."""
    bucket = naming.budget_bucket(namespace)
    return [
        f"kv/{bucket}/{naming.budget_definition_key(name)}",
        f"kv/{bucket}/{naming.budget_ledger_wildcard(name)}",
    ]


async def sweep(operator: Operator, namespaces: set[str]) -> list[str]:
    """Purge the definitions (and ledgers) in ``namespaces`` that no Budget owns: one whose
    cleanup was given up while NATS was down, or whose finalizer was removed by hand, would
    otherwise be enforced for good. The keys are listed before the Budgets, and a definition
    is only ever written for a Budget that exists, so a Budget created meanwhile is listed
    and keeps its own. Returns what was removed."""
    removed = []
    nats = target(operator)
    for namespace in sorted(namespaces):
        defined = await operator.nats.defined_budgets(nats, namespace)
        if not defined:
            continue
        present = {
            b["metadata"]["name"] for b in await operator.kube.list_custom(PLURAL, namespace)
        }
        for name in defined:
            if name in present:
                continue
            # Checked again under the Budget's lock: one created since the listing has had its
            # first pass (which wrote the definition) before, or will have it after.
            async with operator.lock(KIND, namespace, name):
                if await operator.kube.read_custom(PLURAL, namespace, name) is not None:
                    continue
                gone = await operator.nats.delete_budget(nats, namespace, name)
            metrics.forget_budget(namespace, name)
            if gone:
                logger.info("purged the orphaned %s", ", ".join(gone))
            removed += gone
    return removed


async def refresh_once(operator: Operator, sweeping: bool = False) -> None:
    """A pass over every watched Budget not being deleted, a few at a time; ``sweeping``:
    then a sweep of the namespaces with Budgets or Agents for orphaned definitions."""
    semaphore = asyncio.Semaphore(REFRESH_CONCURRENCY)

    async def guarded(run: Awaitable[object], what: str) -> None:
        async with semaphore:
            try:
                await run
            except Exception:
                logger.exception("the pass over %s failed; the next refresh retries", what)

    passes = []
    budgets = await operator.kube.list_watched(PLURAL, operator.settings.namespaces)
    for body in budgets:
        meta = body["metadata"]
        if "deletionTimestamp" not in meta:
            what = f"{PLURAL}/{meta['namespace']}/{meta['name']}"
            passes.append(guarded(budget_pass(operator, body), what))
    await asyncio.gather(*passes)
    if sweeping:
        watched = operator.settings.namespaces
        namespaces = {b["metadata"]["namespace"] for b in budgets}
        namespaces |= {
            a["metadata"]["namespace"] for a in await operator.kube.list_watched(AGENTS, watched)
        }
        try:
            await sweep(operator, namespaces)
        except MessagingUnavailable as error:
            logger.warning("the sweep for orphaned budget definitions failed: %s", error)


async def refresh_forever(operator: Operator) -> None:
    """Every ``budget_refresh_seconds``: spending into status, selectors resolved anew; every
    ``SWEEP_EVERY`` refreshes, orphaned definitions purged."""
    refreshes = 0
    while True:
        await asyncio.sleep(operator.settings.budget_refresh_seconds)
        refreshes += 1
        try:
            await refresh_once(operator, sweeping=refreshes % SWEEP_EVERY == 1)
        except Exception:
            logger.exception("the Budget refresh failed; retrying")
