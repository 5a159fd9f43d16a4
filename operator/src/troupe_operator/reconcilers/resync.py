"""The periodic resync: every pass repeated, so counts reach status and drift is corrected.

kopf timers would put a finalizer on every object, and finalizers are for NATS
cleanup only; so one background task lists the watched objects and runs their passes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from troupe_operator.clients.nats import MessagingUnavailable
from troupe_operator.reconcilers import directory, model_provider, trigger
from troupe_operator.reconcilers.agent import AGENT
from troupe_operator.reconcilers.common import Kind, Operator, run_pass
from troupe_operator.reconcilers.workflow import WORKFLOW

KINDS: tuple[Kind[Any, Any], ...] = (AGENT, WORKFLOW)
RESYNC_CONCURRENCY = 16
logger = logging.getLogger(__name__)


async def resync_once(operator: Operator) -> None:
    """One pass over every watched Agent, Workflow, ModelProvider and Trigger not being deleted (a
    ModelProvider's pass probes its endpoint again: that is how a fixed Secret is seen),
    then a sweep of the gateway directory keys of those namespaces that no object owns."""
    semaphore = asyncio.Semaphore(RESYNC_CONCURRENCY)

    async def guarded(run: Awaitable[object], what: str) -> None:
        async with semaphore:
            try:
                await run
            except Exception:
                logger.exception("resync of %s failed; the next resync retries", what)

    passes = []
    namespaces: set[str] = set()
    for kind in KINDS:
        for body in await operator.kube.list_watched(kind.plural, operator.settings.namespaces):
            meta = body["metadata"]
            namespaces.add(meta["namespace"])
            if "deletionTimestamp" in meta:
                continue
            what = f"{kind.plural}/{meta['namespace']}/{meta['name']}"
            passes.append(guarded(run_pass(operator, kind, body), what))
    for body in await operator.kube.list_watched(
        model_provider.PLURAL, operator.settings.namespaces
    ):
        meta = body["metadata"]
        if "deletionTimestamp" not in meta:
            what = f"{model_provider.PLURAL}/{meta['namespace']}/{meta['name']}"
            passes.append(guarded(model_provider.provider_pass(operator, body), what))
    for body in await operator.kube.list_watched(trigger.PLURAL, operator.settings.namespaces):
        meta = body["metadata"]
        if "deletionTimestamp" not in meta:
            what = f"{trigger.PLURAL}/{meta['namespace']}/{meta['name']}"
            passes.append(guarded(trigger.trigger_pass(operator, body), what))
    await asyncio.gather(*passes)
    try:
        await directory.sweep(operator, namespaces)
    except MessagingUnavailable as error:
        logger.warning("the sweep of the gateway directory failed: %s", error)


async def resync_forever(operator: Operator) -> None:
    """Every ``resync_seconds``: counts into status, drift in JetStream and objects corrected."""
    while True:
        await asyncio.sleep(operator.settings.resync_seconds)
        try:
            await resync_once(operator)
        except Exception:
            logger.exception("resync failed; retrying in %ss", operator.settings.resync_seconds)
