"""CloudEvents 1.0 over NATS: the envelope every Troupe message travels in.

The runtime publishes binary mode (``ce-*`` headers, the data as the payload)
so that a consumer that knows nothing of CloudEvents still reads plain data;
it accepts structured mode (``application/cloudevents+json``) too. Troupe's
extensions: ``priority``, ``correlationid`` (the run id), ``causationid``,
``deadline``, the W3C ``traceparent`` and ``replyto``, the subject a workflow
engine waits on for this event's result or failure.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

SPEC_VERSION: Literal["1.0"] = "1.0"
HEADER_PREFIX = "ce-"
CONTENT_TYPE_HEADER = "content-type"
JSON_CONTENT_TYPE = "application/json"
OCTET_STREAM = "application/octet-stream"
# The types the runtime gives the events it emits: an output is ``<input type>.output``,
# a reply to ``replyto`` is ``<input type>.result``, or ``troupe.error`` when the input failed.
OUTPUT_TYPE_SUFFIX = "output"
RESULT_TYPE_SUFFIX = "result"
ERROR_TYPE = "troupe.error"
TRACEPARENT_PATTERN = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"


class MalformedMessage(Exception):
    """The message is not a usable CloudEvent; retrying cannot help."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CloudEvent(BaseModel):
    """One CloudEvent; ``data`` is decoded JSON, or bytes for other content types."""

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: Literal["1.0"] = SPEC_VERSION
    id: str = Field(min_length=1)
    source: str = Field(min_length=1)
    type: str = Field(min_length=1)
    time: AwareDatetime | None = None
    subject: str | None = None
    datacontenttype: str | None = None
    dataschema: str | None = None
    priority: int | None = Field(default=None, ge=0)
    correlationid: str | None = None
    causationid: str | None = None
    deadline: AwareDatetime | None = None
    traceparent: str | None = Field(default=None, pattern=TRACEPARENT_PATTERN)
    replyto: str | None = Field(default=None, min_length=1)
    data: Any = None

    @property
    def run_id(self) -> str:
        """The correlation id, or the event's own id when it starts a run."""
        return self.correlationid or self.id

    def follow_up(
        self,
        *,
        source: str,
        type: str,
        data: Any,
        index: int,
        scope: str,
        traceparent: str | None = None,
    ) -> CloudEvent:
        """The ``index``-th event caused by this one, with a deterministic id.

        The id depends only on ``scope`` (who produces it), the input's source
        and id, and ``index``: a redelivered input yields the same ids again.
        ``traceparent`` defaults to a new span in this event's trace.
        """
        digest = hashlib.sha256(f"{scope}\n{self.source}\n{self.id}\n{index}".encode())
        return CloudEvent(
            id=digest.hexdigest()[:32],
            source=source,
            type=type,
            time=datetime.now(UTC),
            datacontenttype=OCTET_STREAM if isinstance(data, bytes) else JSON_CONTENT_TYPE,
            priority=self.priority,
            correlationid=self.run_id,
            causationid=self.id,
            deadline=self.deadline,
            traceparent=traceparent or child_traceparent(self.traceparent),
            data=data,
        )


def is_json(content_type: str | None) -> bool:
    """Troupe treats a missing content type as JSON, the common case between agents."""
    if content_type is None:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media in (JSON_CONTENT_TYPE, "text/json") or media.endswith("+json")


def child_traceparent(parent: str | None) -> str:
    """A W3C traceparent for the next hop: same trace, new span (a new trace if none)."""
    span = secrets.token_hex(8)
    if parent is None:
        return f"00-{secrets.token_hex(16)}-{span}-01"
    version, trace, _, flags = parent.split("-")
    return f"{version}-{trace}-{span}-{flags}"


def _describe(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or 'event'}: {item['msg']}"
        for item in error.errors()
    )


def _decode_data(payload: bytes, content_type: str | None) -> Any:
    if not is_json(content_type):
        return payload
    if not payload:
        return None
    try:
        return json.loads(payload)
    except ValueError as error:
        raise MalformedMessage(f"data is not valid JSON: {error}") from error


def _validated(attributes: dict[str, Any]) -> CloudEvent:
    try:
        return CloudEvent.model_validate(attributes)
    except ValidationError as error:
        raise MalformedMessage(f"not a CloudEvent: {_describe(error)}") from error


def _from_structured(payload: bytes) -> CloudEvent:
    try:
        body = json.loads(payload)
    except ValueError as error:
        raise MalformedMessage(f"not a CloudEvent: body is not JSON: {error}") from error
    if not isinstance(body, dict) or "specversion" not in body:
        raise MalformedMessage(
            "not a CloudEvent: no ce-specversion header and no specversion in a JSON body"
        )
    if "data_base64" in body:
        encoded = body.pop("data_base64")
        try:
            body["data"] = base64.b64decode(encoded, validate=True)
        except (TypeError, ValueError) as error:
            raise MalformedMessage(f"data_base64 is not base64: {error}") from error
    return _validated(body)


def parse(headers: dict[str, str] | None, payload: bytes) -> CloudEvent:
    """Read a CloudEvent from a NATS message's headers and payload, in either mode."""
    lowered = {key.lower(): value for key, value in (headers or {}).items()}
    content_type = lowered.get(CONTENT_TYPE_HEADER)
    if f"{HEADER_PREFIX}specversion" not in lowered:
        return _from_structured(payload)
    attributes: dict[str, Any] = {
        key.removeprefix(HEADER_PREFIX): value
        for key, value in lowered.items()
        if key.startswith(HEADER_PREFIX)
    }
    if content_type is not None:
        attributes["datacontenttype"] = content_type
    event = _validated(attributes)
    return event.model_copy(update={"data": _decode_data(payload, content_type)})


def _header_value(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


def encode_data(event: CloudEvent) -> bytes:
    if isinstance(event.data, bytes):
        return event.data
    if event.data is None:
        return b""
    if isinstance(event.data, str) and not is_json(event.datacontenttype):
        return event.data.encode()
    return json.dumps(event.data, separators=(",", ":")).encode()


def to_binary(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """Headers and payload of ``event`` in binary mode, ready to publish."""
    attributes = event.model_dump(exclude={"data", "datacontenttype"}, exclude_none=True)
    headers = {f"{HEADER_PREFIX}{name}": _header_value(value) for name, value in attributes.items()}
    if event.datacontenttype is not None:
        headers[CONTENT_TYPE_HEADER] = event.datacontenttype
    return headers, encode_data(event)
