"""The subject relay: each message captured for a subject Trigger fires it once.

The operator provisions, per subject Trigger, ``naming.trigger_stream(ns, trigger)`` (its
subjects: the Trigger's subject) and on it the durable pull consumer
``naming.TRIGGER_RELAY_CONSUMER``, shared by the gateway replicas. The relay learns which
exist from JetStream itself: every ``RESCAN_SECONDS`` it lists the stream names, and for each
``TROUPE_TRG_<namespace>_<trigger>`` (namespaces and Trigger names are DNS labels, so the
name splits one way) it pulls from the consumer while the stream lives. So no namespace list
is configured, and a Trigger made while the gateway runs is relayed within a rescan.

For each message: the CloudEvent attributes from the NATS binding (``ce-*`` headers, or a
structured ``application/cloudevents+json`` body), the payload being its data; a message
that is no CloudEvent is a payload of its own (JSON, else text), with no type or source.
Then ``cloud_event_matches``, ``map_input``, the task id (``dedupe_id`` of the dedupe key's
value, else ``trg-<uid>-<stream sequence>``), ``Calls.submit``, the ledger, the ack.

- A message that can never fire (not a CloudEvent it claims to be, the filter does not
  match, the mapping fails, the input is refused) is terminated and counted as a failure
  with the reason: never redelivered.
- A fire that may go later (the target not in the directory yet, the target's stream
  missing) is nak'd with a delay; its last delivery (``MAX_ATTEMPTS``, or the consumer's
  ``max_deliver`` when smaller) is terminated and counted as a failure.
- Past the rate limit the relay waits (telling the server the message is in progress):
  the backlog fires at the limit's pace, nothing is dropped.
- A message already fired (its task filed) is acked without firing again.
- While the Trigger is suspended, or its definition is not in the directory, nothing is
  fetched: the stream keeps the messages (within its limits) for when it is resumed.
- A NATS outage ends nothing: each loop retries every ``RETRY_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NotFoundError

from troupe_gateway.calls import CallRefused
from troupe_gateway.firing import DELIVERIES, Firing
from troupe_gateway.kube import is_dns_label
from troupe_gateway.services import Services
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.envelope import MalformedMessage
from troupe_runtime.contract.triggers import (
    TriggerDefinition,
    cloud_event_matches,
    dedupe_id,
    evaluate,
    map_input,
    parse_payload,
)

logger = logging.getLogger(__name__)

RESCAN_SECONDS = 10.0
RETRY_SECONDS = 1.0
IDLE_SECONDS = 2.0
"""How often a suspended (or not yet defined) Trigger's loop looks again."""
FETCH_SECONDS = 5.0
BATCH = 16
MAX_ATTEMPTS = 10
LATER_SECONDS = 5.0
"""The nak delay of a fire that may go later."""
IN_PROGRESS_SECONDS = 5.0
"""While waiting out the rate limit, the server hears the message is in progress this often
(well within any ack wait)."""
STREAM_PREFIX = "TROUPE_TRG_"
MAX_STREAM_PAGES = 100


def attempts_of(max_deliver: int | None) -> int:
    """Deliveries a fire that may go later gets: ``MAX_ATTEMPTS``, fewer when the consumer
    redelivers fewer times (its last one is then terminated and counted, not lost)."""
    if max_deliver is None or max_deliver <= 0:
        return MAX_ATTEMPTS
    return min(MAX_ATTEMPTS, max_deliver)


class NeverFires(Exception):
    """The message cannot fire, now or ever: terminated and counted as a failure."""


class Later(Exception):
    """The message may fire later: nak'd with ``delay`` seconds."""

    def __init__(self, reason: str, delay: float = LATER_SECONDS) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


def trigger_of_stream(name: str) -> tuple[str, str] | None:
    """``(namespace, trigger)`` of a ``naming.trigger_stream`` name, or None."""
    if not name.startswith(STREAM_PREFIX):
        return None
    namespace, _, trigger = name[len(STREAM_PREFIX) :].partition("_")
    if not is_dns_label(namespace) or not is_dns_label(trigger):
        return None
    if naming.trigger_stream(namespace, trigger) != name:
        return None
    return namespace, trigger


def message_event(
    headers: Mapping[str, str] | None, data: bytes
) -> tuple[str | None, str | None, Any]:
    """``(ce type, ce source, payload)`` of a captured message; ``NeverFires`` with the
    reason for one that claims to be a CloudEvent and is not one, or is too large."""
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    claims = envelope.SPECVERSION_HEADER in lowered
    media = lowered.get(envelope.CONTENT_TYPE_HEADER, "").split(";")[0].strip().lower()
    if not claims and media != envelope.STRUCTURED_CONTENT_TYPE:
        # A JSON object with a specversion is read as a structured CloudEvent too.
        stripped = data.lstrip()
        if stripped.startswith(b"{") and b'"specversion"' in data:
            try:
                body = json.loads(data)
            except (ValueError, RecursionError):
                body = None
            claims = isinstance(body, dict) and "specversion" in body
    try:
        if not claims and media != envelope.STRUCTURED_CONTENT_TYPE:
            return None, None, parse_payload(data)
        event = envelope.parse(dict(headers or {}), data)
    except MalformedMessage as error:
        raise NeverFires(str(error)[:300]) from None
    except ValueError as error:
        raise NeverFires(str(error)) from None
    payload = event.data
    if isinstance(payload, bytes):
        try:
            payload = parse_payload(payload)
        except ValueError as error:
            raise NeverFires(str(error)) from None
    return event.type, event.source, payload


def fire_of(
    trigger: TriggerDefinition, headers: Mapping[str, str] | None, data: bytes, sequence: int
) -> tuple[Any, str]:
    """``(input, task id)`` of a captured message, or ``NeverFires`` saying why not."""
    subject = trigger.spec.source.subject
    ce_type, source, payload = message_event(headers, data)
    filter_ = subject.filter if subject is not None else None
    if not cloud_event_matches(filter_, ce_type, source):
        raise NeverFires(
            f"the CloudEvent (type {str(ce_type)[:100]!r}, source {str(source)[:100]!r}) "
            "does not match the Trigger's filter"
        )
    try:
        value = map_input(trigger.spec, payload)
        dedupe = (
            evaluate(trigger.spec.dedupe_key, payload)
            if trigger.spec.dedupe_key is not None
            else None
        )
    except ValueError as error:
        raise NeverFires(str(error)) from None
    except Exception as error:  # a JMESPath runtime error on a hostile payload
        raise NeverFires(f"the dedupe key failed: {type(error).__name__}") from None
    task_id = (
        dedupe_id(trigger.uid, dedupe) if dedupe is not None else f"trg-{trigger.uid}-{sequence}"
    )
    return value, task_id


class Relay:
    def __init__(self, services: Services, firing: Firing) -> None:
        self._services = services
        self._firing = firing
        self._loops: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Rescan the streams and keep one pull loop per subject Trigger's stream."""
        while True:
            try:
                for found in await self._streams():
                    task = self._loops.get(found)
                    if task is None or task.done():
                        self._loops[found] = asyncio.create_task(self._pull(*found))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning("the relay could not list the streams: %s", type(error).__name__)
            await asyncio.sleep(RESCAN_SECONDS)

    async def stop(self) -> None:
        loops = list(self._loops.values())
        for task in loops:
            task.cancel()
        for task in loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _streams(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        offset = 0
        for _ in range(MAX_STREAM_PAGES):
            answer = await self._services.nc.request(
                "$JS.API.STREAM.NAMES", json.dumps({"offset": offset}).encode(), timeout=5
            )
            body = json.loads(answer.data)
            names = body.get("streams") or []
            for name in names:
                if isinstance(name, str) and (pair := trigger_of_stream(name)) is not None:
                    found.append(pair)
            offset += len(names)
            if not names or offset >= int(body.get("total", 0)):
                break
        return found

    async def _pull(self, namespace: str, name: str) -> None:
        """Fetch and fire while the stream and its consumer exist."""
        stream = naming.trigger_stream(namespace, name)
        js = self._services.js
        subscription = None
        attempts = MAX_ATTEMPTS
        try:
            while True:
                trigger = await self._services.directory.trigger(namespace, name)
                try:
                    if (
                        trigger is None
                        or trigger.spec.source.subject is None
                        or trigger.spec.suspend
                    ):
                        await js.stream_info(stream)  # gone: this loop ends
                        await asyncio.sleep(IDLE_SECONDS)
                        continue
                    if subscription is None:
                        info = await js.consumer_info(stream, naming.TRIGGER_RELAY_CONSUMER)
                        attempts = attempts_of(info.config.max_deliver)
                        subscription = await js.pull_subscribe_bind(
                            durable=naming.TRIGGER_RELAY_CONSUMER, stream=stream
                        )
                    try:
                        messages = await subscription.fetch(BATCH, timeout=FETCH_SECONDS)
                    except (NatsTimeoutError, TimeoutError):
                        continue
                    for msg in messages:
                        await self.handle(trigger, msg, attempts)
                except NotFoundError:
                    logger.info("the relay stops for Trigger %s/%s: no stream", namespace, name)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    logger.warning(
                        "the relay of Trigger %s/%s: %s; retrying",
                        namespace,
                        name,
                        type(error).__name__,
                    )
                    if subscription is not None:  # bound again, or found gone, next time
                        with contextlib.suppress(Exception):
                            await subscription.unsubscribe()
                        subscription = None
                    await asyncio.sleep(RETRY_SECONDS)
        finally:
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    async def handle(
        self, trigger: TriggerDefinition, msg: Msg, attempts: int = MAX_ATTEMPTS
    ) -> None:
        metadata = msg.metadata
        try:
            data, task_id = fire_of(trigger, msg.headers, msg.data or b"", metadata.sequence.stream)
            await self._fire(trigger, msg, data, task_id)
        except NeverFires as error:
            DELIVERIES.labels("subject", "never").inc()
            await self._firing.failed(trigger, str(error))
            await msg.term()
            return
        except Later as later:
            if metadata.num_delivered >= attempts:
                DELIVERIES.labels("subject", "never").inc()
                await self._firing.failed(
                    trigger, f"{later.reason} (after {metadata.num_delivered} deliveries)"
                )
                await msg.term()
            else:
                DELIVERIES.labels("subject", "later").inc()
                await msg.nak(delay=later.delay)
            return
        await msg.ack()

    async def _fire(self, trigger: TriggerDefinition, msg: Msg, data: Any, task_id: str) -> None:
        try:
            entry = await self._firing.target(trigger)
        except CallRefused as refused:
            raise Later(refused.reason) from None
        if await self._firing.existing(entry, task_id) is not None:
            DELIVERIES.labels("subject", "duplicate").inc()
            return  # fired already: a redelivery, or the dedupe key's value again
        while (wait := await self._firing.limiter.take(trigger)) > 0:
            await msg.in_progress()
            await asyncio.sleep(min(wait, IN_PROGRESS_SECONDS))
        try:
            await self._firing.fire(trigger, entry, data, task_id)
            DELIVERIES.labels("subject", "fired").inc()
        except CallRefused as refused:
            await self._firing.limiter.give_back(trigger)
            if refused.status >= 500:
                raise Later(refused.reason) from None
            raise NeverFires(refused.reason) from None


@asynccontextmanager
async def lifespan(services: Services) -> AsyncIterator[None]:
    relay = Relay(services, services.firing)
    task = asyncio.create_task(relay.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await relay.stop()


def routes(services: Services) -> list[Any]:
    return []
