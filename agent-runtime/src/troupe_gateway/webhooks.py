"""Signed webhooks: ``POST /hooks/{namespace}/{trigger}`` fires a webhook Trigger.

No bearer token: the signature is the authentication. ``Troupe-Timestamp`` (unix seconds)
and ``Troupe-Signature: sha256=<hex>`` = HMAC-SHA256 over ``<timestamp>.<body>`` with the
key of the Secret the Trigger's ``secretRef`` names (``triggers.signature_problem``). In
this order (docs/gateway.md, "Webhooks"):

- 404 no webhook Trigger of that name (nor any directory in that namespace);
- 413 a body past ``triggers.MAX_PAYLOAD_BYTES``;
- 503 the Secret or its key is missing, or the API server did not answer (the reason names
  the Secret, never its content);
- 401 a missing, stale or wrong signature (nothing is written anywhere);
- 423 the Trigger is suspended (nothing is consumed: the same delivery fires once resumed,
  within its replay window);
- 409 the signature was already accepted (by any replica: ``webhook_seen_bucket``);
- 422 the input mapping or the dedupe key failed on the payload (the signature stays
  accepted: the same delivery could never fire, and its replays are 409);
- 503 the target is not in the directory;
- 200 ``{"duplicate": true}`` the dedupe key's value fired already: that task is answered;
- 429 past the rate limit, with ``Retry-After`` (the signature is released, so the same
  delivery may be retried);
- 202 ``{"taskId", "contextId", "target"}``: the fire is a task, its id ``dedupe_id`` of the
  dedupe key's value, else derived from the signature, so no delivery fires twice.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from troupe_gateway.auth import TtlCache
from troupe_gateway.calls import CallRefused
from troupe_gateway.firing import DELIVERIES, Firing
from troupe_gateway.kube import KubeUnavailable, is_dns_label
from troupe_gateway.services import Services
from troupe_runtime.contract import naming
from troupe_runtime.contract.gateway import DirectoryEntry, TaskRecord
from troupe_runtime.contract.triggers import (
    MAX_PAYLOAD_BYTES,
    TriggerDefinition,
    TriggerSpec,
    WebhookSource,
    dedupe_id,
    evaluate,
    map_input,
    parse_payload,
    signature_problem,
)

logger = logging.getLogger(__name__)

TIMESTAMP_HEADER = "troupe-timestamp"
SIGNATURE_HEADER = "troupe-signature"
SECRET_TTL_SECONDS = 30.0
MISSING_SECRET_TTL_SECONDS = 5.0
SECRETS_CACHED = 1024
MIN_SEEN_TTL = timedelta(minutes=10)
"""The seen-signature bucket keeps a mark at least this long, and at least twice the
longest replay window served (a timestamp is fresh from ``window`` before it to ``window``
after it)."""


class HookRefused(Exception):
    def __init__(self, status: int, reason: str, headers: Mapping[str, str] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})


def _values(headers: Mapping[str, str], name: str) -> list[str]:
    return [value for key, value in headers.items() if key.lower() == name]


def delivery_headers(headers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``(timestamp, signature)`` from the request's headers; ``HookRefused(401)`` when one
    is sent twice (which of them would be checked is not for a proxy to decide)."""
    found: list[str | None] = []
    for name, shown in (
        (TIMESTAMP_HEADER, "Troupe-Timestamp"),
        (SIGNATURE_HEADER, "Troupe-Signature"),
    ):
        values = _values(headers, name)
        if len(values) > 1:
            raise HookRefused(401, f"send {shown} once")
        found.append(values[0].strip() if values else None)
    return found[0], found[1]


def normalized_signature(signature: str) -> str:
    """The form ``signature_problem`` compares: one delivery, however its hex is cased."""
    return signature.strip().lower()


def signature_task_id(uid: str, signature: str) -> str:
    """The task id of a fire without a dedupe key: the same for the same delivery."""
    digest = hashlib.sha256(f"{uid}:signature:{normalized_signature(signature)}".encode())
    return f"trg-{digest.hexdigest()[:40]}"


def fire_input(spec: TriggerSpec, body: bytes) -> tuple[Any, Any]:
    """``(input, dedupe value)`` for a request body; ``HookRefused(413|422)``. A dedupe key
    that evaluates to null gives no dedupe value (the delivery fires under its own id)."""
    try:
        payload = parse_payload(body)
    except ValueError as error:
        raise HookRefused(413, str(error)) from None
    try:
        data = map_input(spec, payload)
        dedupe = evaluate(spec.dedupe_key, payload) if spec.dedupe_key is not None else None
    except ValueError as error:
        raise HookRefused(422, str(error)) from None
    except Exception as error:  # a JMESPath runtime error on a hostile payload
        raise HookRefused(422, f"the dedupe key failed: {type(error).__name__}") from None
    return data, dedupe


async def bounded_body(request: Request) -> bytes:
    """The body, read no further than ``MAX_PAYLOAD_BYTES`` + 1 (as ``plain`` reads its):
    ``HookRefused(413)`` past it, however the length is declared."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_PAYLOAD_BYTES:
        raise HookRefused(413, f"the body is over {MAX_PAYLOAD_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_PAYLOAD_BYTES:
            raise HookRefused(413, f"the body is over {MAX_PAYLOAD_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class Webhooks:
    def __init__(self, services: Services, firing: Firing) -> None:
        self._services = services
        self._js: JetStreamContext = services.js
        self._firing = firing
        self._secrets: TtlCache[tuple[str, str], dict[str, bytes] | None] = TtlCache(
            SECRET_TTL_SECONDS, SECRETS_CACHED, time.monotonic
        )
        self._seen: dict[str, tuple[KeyValue, float]] = {}

    async def definition(
        self, namespace: str, name: str
    ) -> tuple[TriggerDefinition, WebhookSource]:
        if not is_dns_label(namespace) or not is_dns_label(name):
            raise HookRefused(404, "no webhook Trigger there: names are DNS labels")
        # An unauthenticated caller may name any namespace: a directory is watched only
        # where one exists.
        if not await self._services.directory.exists(namespace):
            raise HookRefused(404, f"namespace {namespace} has no webhook Trigger {name}")
        trigger = await self._services.directory.trigger(namespace, name)
        if trigger is None or trigger.spec.source.webhook is None:
            raise HookRefused(404, f"namespace {namespace} has no webhook Trigger {name}")
        return trigger, trigger.spec.source.webhook

    async def secret(self, namespace: str, source: WebhookSource) -> bytes:
        ref = source.secret_ref

        async def load() -> tuple[dict[str, bytes] | None, float]:
            data = await self._services.kube.secret(namespace, ref.name)
            return data, SECRET_TTL_SECONDS if data is not None else MISSING_SECRET_TTL_SECONDS

        try:
            data = await self._secrets.get((namespace, ref.name), load)
        except KubeUnavailable as error:
            if "HTTP 403" in str(error):
                raise HookRefused(
                    503,
                    f"the gateway may not read the Trigger's Secret {ref.name}: its role has "
                    f"no get on Secrets in namespace {namespace}",
                ) from None
            raise HookRefused(
                503, "the Kubernetes API server did not answer; try again", {"Retry-After": "1"}
            ) from None
        if data is None:
            raise HookRefused(503, f"the Trigger's Secret {ref.name} does not exist")
        key = data.get(ref.key)
        if not key:
            raise HookRefused(503, f"the Trigger's Secret {ref.name} has no key {ref.key}")
        return key

    async def _seen_bucket(self, namespace: str, window: timedelta) -> KeyValue:
        """The namespace's seen-signature bucket, its TTL raised to twice ``window``."""
        needed = max(MIN_SEEN_TTL, 2 * window).total_seconds()
        kept = self._seen.get(namespace)
        if kept is not None and kept[1] >= needed:
            return kept[0]
        bucket = naming.webhook_seen_bucket(namespace)
        try:
            kv = await self._js.key_value(bucket)
        except BucketNotFoundError:
            try:
                kv = await self._js.create_key_value(
                    KeyValueConfig(
                        bucket=bucket,
                        history=1,
                        ttl=needed,
                        storage=StorageType.FILE,
                        description=f"Webhook signatures accepted in namespace {namespace}",
                    )
                )
            except BadRequestError:  # made meanwhile by another replica
                kv = await self._js.key_value(bucket)
        info = await self._js.stream_info(naming.kv_stream(bucket))
        ttl = float(info.config.max_age or 0)
        if 0 < ttl < needed:
            config = info.config
            config.max_age = needed
            await self._js.update_stream(config)
            ttl = needed
        self._seen[namespace] = (kv, ttl if ttl > 0 else math.inf)
        return kv

    async def handle(self, request: Request) -> Response:
        namespace = request.path_params["namespace"]
        trigger, source = await self.definition(namespace, request.path_params["trigger"])
        body = await bounded_body(request)
        secret = await self.secret(namespace, source)
        timestamp, signature = delivery_headers(request.headers)
        problem = signature_problem(
            secret, timestamp, signature, body, time.time(), source.replay_window
        )
        if problem is not None or signature is None:
            raise HookRefused(401, problem or "Troupe-Signature must be sha256=<hex>")
        if trigger.spec.suspend:
            raise HookRefused(423, f"Trigger {trigger.name} is suspended")
        seen = await self._seen_bucket(namespace, source.replay_window)
        key = naming.webhook_seen_key(normalized_signature(signature))
        try:
            mark = await seen.create(key, b"accepted")
        except KeyWrongLastSequenceError:
            raise HookRefused(409, "this delivery was already accepted") from None
        try:
            data, dedupe = fire_input(trigger.spec, body)
        except HookRefused as refused:
            # It can never fire: its mark stays, so a replay is 409, not another failure.
            await self._firing.failed(trigger, refused.reason)
            raise
        try:
            try:
                entry = await self._firing.target(trigger)
            except CallRefused as refused:
                await self._firing.failed(trigger, refused.reason)
                raise HookRefused(refused.status, refused.reason) from None
            task_id = (
                dedupe_id(trigger.uid, dedupe)
                if dedupe is not None
                else signature_task_id(trigger.uid, signature)
            )
            return await self._fire(trigger, entry, data, task_id)
        except BaseException:
            # Nothing fired: the same delivery may be retried.
            try:
                await seen.delete(key, last=mark)
            except Exception:
                logger.warning("the seen mark of a webhook of %s was not released", trigger.name)
            raise

    async def _fire(
        self, trigger: TriggerDefinition, entry: DirectoryEntry, data: Any, task_id: str
    ) -> Response:
        earlier = await self._firing.existing(entry, task_id)
        if earlier is not None:
            return JSONResponse(self._answer(trigger, earlier) | {"duplicate": True})
        wait = await self._firing.limiter.take(trigger)
        if wait > 0:
            reason = f"Trigger {trigger.name} is past its rate limit"
            await self._firing.failed(trigger, reason)
            raise HookRefused(429, reason, {"Retry-After": retry_after(wait)})
        try:
            record = await self._firing.fire(trigger, entry, data, task_id)
        except CallRefused as refused:
            await self._firing.limiter.give_back(trigger)
            await self._firing.failed(trigger, refused.reason)
            raise HookRefused(refused.status, refused.reason) from None
        return JSONResponse(self._answer(trigger, record), status_code=202)

    @staticmethod
    def _answer(trigger: TriggerDefinition, record: TaskRecord) -> dict[str, Any]:
        return {
            "taskId": record.task_id,
            "contextId": record.context_id,
            "target": {"kind": record.kind, "name": record.name},
            "trigger": trigger.name,
        }


def routes(services: Services) -> list[BaseRoute]:
    hooks = Webhooks(services, services.firing)

    async def hook(request: Request) -> Response:
        try:
            answer = await hooks.handle(request)
        except HookRefused as refused:
            DELIVERIES.labels("webhook", str(refused.status)).inc()
            return JSONResponse(
                {"error": refused.reason, "reason": refused.reason},
                status_code=refused.status,
                headers=refused.headers or None,
            )
        DELIVERIES.labels("webhook", "fired" if answer.status_code == 202 else "duplicate").inc()
        return answer

    return [Route("/hooks/{namespace}/{trigger}", hook, methods=["POST"])]
