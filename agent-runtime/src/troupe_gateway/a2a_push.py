"""A2A push-notification configs in the namespace's tasks bucket, and their delivery.

**Where.** A config is the value of ``push.<digest of the task id>.<config id>`` in
``naming.tasks_bucket``: any replica reads it, and it expires with the task records (the
bucket's max age). The value keeps the target (kind, name) and the caller who set it
(``owner``): a caller reads, lists and deletes only their own configs of that target's task.
The token is stored, since it is sent with the notification; it is never logged.

**Delivery.** The SDK's ``BasePushNotificationSender`` POSTs the task (a ``StreamResponse``
with ``task``) to the URL with ``X-A2A-Notification-Token`` and, when given,
``Authorization: <scheme> <credentials>``. Its dispatch read (``get_info_for_dispatch``)
*claims* each config first, a compare-and-set of ``delivered`` on the key's revision, so a
config is sent once, whichever replicas try. The replica that accepted the config (or the
task with one) watches the task and delivers when it ends; **if that replica dies first,
nothing delivers the notification** (the config stays, undelivered, until it expires): the
caller still reads the outcome with GetTask or ListTasks. Delivery is best effort, as the
SDK's sender is: a receiver that fails or times out (10 s) is logged, not retried.

**Which URLs.** http and https only, at most ``URL_MAX`` characters; by default only hosts
that resolve to public addresses (the SDK's ``validate_push_notification_url``: no
loopback, private, link-local or metadata addresses), checked when a config is set (a
clear 400) and again when it is sent (DNS may have changed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

from a2a.server.context import ServerCallContext
from a2a.server.tasks.push_notification_config_store import (
    PushNotificationConfigStore,
    normalize_push_notification_config,
)
from a2a.types.a2a_pb2 import TaskPushNotificationConfig
from a2a.utils.errors import InvalidParamsError
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from troupe_runtime.contract import naming
from troupe_runtime.contract.gateway import DirectoryEntry

log = logging.getLogger(__name__)

KEY_PREFIX: Final = "push"
CONFIG_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
URL_MAX: Final = 2048
TOKEN_MAX: Final = 4096
CONFIGS_MAX: Final = 16
"""Configs per task: a caller cannot make one task fan out to a thousand URLs."""
OWNER_STATE: Final = "troupe.owner"
"""The ``ServerCallContext.state`` key of the caller's user name."""

UrlValidator = Callable[[str], Awaitable[bool]]


def task_digest(task_id: str) -> str:
    return hashlib.sha256(task_id.encode()).hexdigest()[:32]


def config_key(task_id: str, config_id: str) -> str:
    return f"{KEY_PREFIX}.{task_digest(task_id)}.{config_id}"


def config_wildcard(task_id: str) -> str:
    return f"{KEY_PREFIX}.{task_digest(task_id)}.*"


async def checked(
    config: TaskPushNotificationConfig, task_id: str, validator: UrlValidator | None
) -> TaskPushNotificationConfig:
    """The config normalized (a config id, the task's id), or ``InvalidParamsError``."""
    url = config.url
    if not url or len(url) > URL_MAX or not url.startswith(("http://", "https://")):
        raise InvalidParamsError(
            message=f"a push notification URL is http or https, at most {URL_MAX} characters"
        )
    if len(config.token) > TOKEN_MAX or len(config.authentication.credentials) > TOKEN_MAX:
        raise InvalidParamsError(message=f"a push token is at most {TOKEN_MAX} characters")
    if config.id and not CONFIG_ID_PATTERN.match(config.id):
        raise InvalidParamsError(message="a push config id is 1 to 64 of [A-Za-z0-9_-]")
    if validator is not None and not await validator(url):
        raise InvalidParamsError(
            message="the push notification URL is refused: its host must resolve to a "
            "public address"
        )
    normalized = normalize_push_notification_config(task_id, config)
    if normalized.id == task_id and not CONFIG_ID_PATTERN.match(normalized.id):
        normalized.id = uuid.uuid4().hex
    normalized.tenant = ""
    return normalized


class KvPushConfigStore(PushNotificationConfigStore):
    """The configs of one target's tasks, as the SDK's sender and the handler read them."""

    def __init__(self, js: JetStreamContext, entry: DirectoryEntry) -> None:
        self.js = js
        self.entry = entry
        self.bucket = naming.tasks_bucket(entry.namespace)
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(self.bucket)
        return self._kv

    def _value(self, config: TaskPushNotificationConfig, owner: str) -> bytes:
        record = {
            "kind": self.entry.kind,
            "name": self.entry.name,
            "owner": owner,
            "delivered": False,
            "config": base64.b64encode(config.SerializeToString()).decode(),
        }
        return json.dumps(record, separators=(",", ":")).encode()

    def _parsed(self, raw: bytes) -> tuple[dict[str, Any], TaskPushNotificationConfig] | None:
        """The record and its config when it is one of this target's; None for junk."""
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or not isinstance(record.get("config"), str):
                return None
            encoded = base64.b64decode(record["config"], validate=True)
        except (ValueError, binascii.Error, RecursionError):
            return None
        try:
            config = TaskPushNotificationConfig.FromString(encoded)
        except Exception:  # protobuf's DecodeError (no stubs): junk under the key
            return None
        if (record.get("kind"), record.get("name")) != (self.entry.kind, self.entry.name):
            return None
        return record, config

    async def _records(
        self, task_id: str
    ) -> list[tuple[str, int, dict[str, Any], TaskPushNotificationConfig]]:
        """Key, revision, record and config of each of the task's configs, listed from the
        stream's subject index (a KV watch's initial values can end short, nats.py#842)."""
        kv = await self.kv()
        prefix = f"$KV.{self.bucket}."
        info = await self.js.stream_info(
            naming.kv_stream(self.bucket), subjects_filter=prefix + config_wildcard(task_id)
        )
        found = []
        for subject in sorted(info.state.subjects or {}):
            key = subject[len(prefix) :]
            try:
                stored = await kv.get(key)
            except NotFoundError:
                continue
            parsed = self._parsed(stored.value or b"")
            if parsed is not None:
                found.append((key, stored.revision or 0, *parsed))
        return found

    async def set_info(
        self,
        task_id: str,
        notification_config: TaskPushNotificationConfig,
        context: ServerCallContext,
    ) -> TaskPushNotificationConfig:
        owner = str(context.state.get(OWNER_STATE, ""))
        config = normalize_push_notification_config(task_id, notification_config)
        key = config_key(task_id, config.id)
        existing = {key for key, *_ in await self._records(task_id)}
        if key not in existing and len(existing) >= CONFIGS_MAX:
            raise InvalidParamsError(message=f"a task has at most {CONFIGS_MAX} push configs")
        await (await self.kv()).put(key, self._value(config, owner))
        return config

    async def get_info(
        self, task_id: str, context: ServerCallContext
    ) -> list[TaskPushNotificationConfig]:
        owner = str(context.state.get(OWNER_STATE, ""))
        return [
            config
            for _, _, record, config in await self._records(task_id)
            if record.get("owner") == owner
        ]

    async def get_info_for_dispatch(self, task_id: str) -> list[TaskPushNotificationConfig]:
        """The configs this call claims for sending: each is sent once, by one replica."""
        kv = await self.kv()
        claimed = []
        for key, revision, record, config in await self._records(task_id):
            if record.get("delivered"):
                continue
            record["delivered"] = True
            try:
                await kv.update(key, json.dumps(record).encode(), last=revision)
            except KeyWrongLastSequenceError:
                continue  # another replica claimed it, or it changed since it was read
            claimed.append(config)
        return claimed

    async def delete_info(
        self, task_id: str, context: ServerCallContext, config_id: str | None = None
    ) -> None:
        owner = str(context.state.get(OWNER_STATE, ""))
        kv = await self.kv()
        for key, _, record, config in await self._records(task_id):
            if record.get("owner") == owner and config_id in (None, config.id):
                await kv.delete(key)
