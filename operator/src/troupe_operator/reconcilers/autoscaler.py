"""The native autoscaler's polling loop: scale-from-zero within a bounded delay.

A full pass over every Agent each resync would be both too slow to wake an agent at zero
and too loud at a thousand agents, so this loop polls only the Agents registered as
autoscaled (``Operator.autoscaled``), every ``autoscale_seconds``, with one JetStream API
request per priority consumer and nothing of Kubernetes. When its reading says replicas
should change, it runs the Agent's full pass, which decides again from fresh facts (the
Deployment, the consumers) under the Agent's lock and writes. An agent at zero replicas
also has a core-NATS subscription on its inbox (``Wakers``), so its first message wakes the
loop at once; the poll still bounds the delay when that subscription is down. So the delay
from a first message to a pod being asked for is one look and one pass, at most
``autoscale_seconds`` plus one pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from troupe_operator.builders import autoscale
from troupe_operator.clients.nats import MessagingUnavailable, SubjectWatch
from troupe_operator.reconcilers.agent import AGENT
from troupe_operator.reconcilers.common import Autoscaled, Operator, run_pass
from troupe_runtime.contract import naming

AUTOSCALE_CONCURRENCY = 16
logger = logging.getLogger(__name__)


async def _check(operator: Operator, namespace: str, name: str, watched: Autoscaled) -> bool:
    """Poll one Agent; run its pass when replicas should change. True when it ran."""
    try:
        backlog = await operator.nats.backlog(watched.target, watched.resources)
    except MessagingUnavailable as error:
        logger.warning("autoscaler: cannot read %s/%s's consumers: %s", namespace, name, error)
        return False
    decision = autoscale.plan_replicas(
        watched.policy, watched.current, backlog, datetime.now(UTC), watched.scaled_at
    )
    if not decision.changes:
        return False
    # The pass registers the Agent again when it gets to scale it; one that does not (its
    # spec refused, a Secret missing, an HPA in charge) leaves it unpolled until a later
    # pass does, or this loop would run a full pass at every look on stale facts. A pass
    # that failed or was blocked (NATS) is retried at the next look, as before.
    operator.autoscaled.pop((namespace, name), None)
    body = await operator.kube.read_custom(AGENT.plural, namespace, name)
    if body is None or "deletionTimestamp" in body["metadata"]:
        return False
    try:
        blocked = await run_pass(operator, AGENT, body)
    except BaseException:
        operator.autoscaled.setdefault((namespace, name), watched)
        raise
    if blocked is not None:
        operator.autoscaled.setdefault((namespace, name), watched)
    return True


async def autoscale_once(operator: Operator) -> list[str]:
    """One look at every autoscaled Agent; returns those whose pass ran."""
    semaphore = asyncio.Semaphore(AUTOSCALE_CONCURRENCY)

    async def guarded(key: tuple[str, str], watched: Autoscaled) -> str | None:
        async with semaphore:
            try:
                ran = await _check(operator, *key, watched)
            except Exception:
                logger.exception("autoscaler: %s/%s failed; the next look retries", *key)
                return None
            return f"{key[0]}/{key[1]}" if ran else None

    checked = await asyncio.gather(
        *(guarded(key, watched) for key, watched in list(operator.autoscaled.items()))
    )
    return [name for name in checked if name is not None]


class Wakers:
    """Core-NATS subscriptions on the inboxes of the autoscaled Agents at zero replicas: a
    message to one wakes the loop at once instead of at its next poll. Only agents at zero
    have one, so a busy agent's traffic never reaches the operator."""

    def __init__(self) -> None:
        self.woken = asyncio.Event()
        self.watches: dict[tuple[str, str], SubjectWatch] = {}

    async def refresh(self, operator: Operator) -> None:
        """Subscribe for the agents now at zero; drop the others' and the dead ones."""
        for key in list(self.watches):
            watched = operator.autoscaled.get(key)
            watch = self.watches[key]
            if watched is None or watched.current > 0 or not watch.alive:
                await watch.close()
                del self.watches[key]
        for key, watched in list(operator.autoscaled.items()):
            if watched.current > 0 or key in self.watches:
                continue
            subject = naming.inbox_wildcard(*key)
            try:
                self.watches[key] = await operator.nats.watch_subject(
                    watched.target, subject, self.woken.set
                )
            except MessagingUnavailable as error:
                logger.warning("autoscaler: cannot watch %s: %s", subject, error)

    async def close(self) -> None:
        for watch in self.watches.values():
            await watch.close()
        self.watches.clear()


async def autoscale_forever(operator: Operator) -> None:
    """Every ``autoscale_seconds``, or at once when a message reaches an agent at zero, a
    look at the autoscaled Agents."""
    wakers = Wakers()
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakers.woken.wait(), operator.settings.autoscale_seconds)
            wakers.woken.clear()
            try:
                await autoscale_once(operator)
                await wakers.refresh(operator)
            except Exception:
                logger.exception("the autoscaler failed; retrying")
    finally:
        await wakers.close()
