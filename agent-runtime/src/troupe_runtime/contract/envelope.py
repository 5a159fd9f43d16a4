"""CloudEvents 1.0 over NATS: the envelope every Troupe message travels in.

The runtime publishes binary mode (``ce-*`` headers, the data as the payload)
so that a consumer that knows nothing of CloudEvents still reads plain data;
it accepts structured mode (``application/cloudevents+json``) too. Troupe's
extensions: ``priority``, ``correlationid`` (the run id), ``causationid``,
``deadline``, the W3C ``traceparent``, ``replyto``, the subject a workflow
engine waits on for this event's result or failure, and ``sessionid``, the conversation an
LLM agent's message belongs to (A2A's contextId; ``contract.sessions``).

This module is the message boundary, and it follows the CloudEvents NATS
binding (binary mode as in the HTTP binding):

- every input is weighed against ``limits.Limits`` before a byte of it is
  decoded, and each input is classified once: an event, or ``MalformedMessage``
  with the precise reason, which no retry can change;
- ``datacontenttype`` is read from ``ce-datacontenttype`` (what the Go SDK
  sends) or ``content-type``, and both are written;
- ``ce-*`` header values are percent-decoded on input (a double-quoted value is
  unquoted first) and percent-encoded on output: space, ``"``, ``%`` and every
  character outside printable ASCII, as the bytes of its UTF-8;
- JSON data is decoded without recursion blow-ups (at most ``json_depth``
  levels) and without ``NaN``, ``Infinity`` or numbers a double cannot hold;
  text (``text/*``) reaches the handler as ``str``, anything else as ``bytes``;
- on output, JSON data is checked before it is encoded: ``NaN``, ``Infinity``,
  values JSON cannot represent and data nested too deep raise
  ``UnpublishableEvent``, a ``SchemaViolation``, so they are never published;
- a structured event with both ``data`` and ``data_base64`` is refused;
- an invalid ``traceparent`` (W3C rules) is dropped: the next hop starts a
  new trace instead of carrying a broken one on;
- a ``sessionid`` is 1 to 200 letters, digits, ``-``, ``_`` or ``=`` (the gateway's task and
  context ids): anything else makes the message ``MalformedMessage`` (dead letter
  ``malformed``, the reason naming ``sessionid``), because running it without its session
  would answer without the conversation the sender meant. It is not carried on to the
  events sent for the message: a session is one caller's conversation with one agent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from troupe_runtime.contract.grammar import DNS_LABEL_MAX, DNS_LABEL_PATTERN
from troupe_runtime.contract.limits import DEFAULT_LIMITS, MAX_JSON_DEPTH, Limits, oversize

SPEC_VERSION: Literal["1.0"] = "1.0"
HEADER_PREFIX = "ce-"
CONTENT_TYPE_HEADER = "content-type"
DATACONTENTTYPE_HEADER = f"{HEADER_PREFIX}datacontenttype"
SPECVERSION_HEADER = f"{HEADER_PREFIX}specversion"
JSON_CONTENT_TYPE = "application/json"
OCTET_STREAM = "application/octet-stream"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
DEFAULT_CHARSET = "utf-8"
# The types the runtime gives the events it emits: an output is ``<input type>.output``,
# a reply to ``replyto`` is ``<input type>.result``, or ``troupe.error`` when the input failed.
OUTPUT_TYPE_SUFFIX = "output"
RESULT_TYPE_SUFFIX = "result"
WORKFLOW_ATTRIBUTE = "troupeworkflow"
"""The Workflow a step event belongs to: the engine sets it, agents carry it on to what
they send for the event (outputs, replies, agents called as tools), so a Workflow's Budget
counts calls made anywhere in its runs."""
ERROR_TYPE = "troupe.error"
TRACEPARENT_PATTERN = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
SESSION_ATTRIBUTE = "sessionid"
SESSION_ID_PATTERN = r"^[-_=a-zA-Z0-9]{1,200}$"
SESSION_ID_MAX = 200

# W3C trace context: version-traceid-parentid-flags, later versions may append "-...".
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.S)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
# CloudEvents attribute names: lower-case letters and digits (spec, "Attribute Naming").
_ATTRIBUTE_NAME = re.compile(r"[a-z0-9]+")
_STRUCTURED_DATA_KEYS = frozenset({"data", "data_base64"})
MAX_EXTENSION_NAME_LENGTH = 20
"""CloudEvents: extension names "SHOULD NOT exceed 20 characters"."""
MAX_EXTENSION_VALUE_BYTES = 1024
"""A string extension's UTF-8 size; percent-encoded it stays well inside a header value."""
_INTEGER_RANGE = range(-(2**31), 2**31)
"""The CloudEvents Integer type: a signed 32-bit number."""
# The CloudEvents type system forbids control characters and surrogates in strings.
_FORBIDDEN_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_MEDIA_TYPE = re.compile(r"[\x20-\x7e]+")
# Printable ASCII but space, '"' and '%': what a header value carries unencoded.
_HEADER_SAFE = re.compile(r"[!#$&-~]*")
_SAFE_CHARS = frozenset(chr(code) for code in range(0x21, 0x7F)) - {'"', "%"}
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class MalformedMessage(Exception):
    """The message is not a usable CloudEvent; retrying cannot help."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SchemaViolation(Exception):
    """Data does not fit the contract (its schema) or the format; retrying cannot help.

    Defined here, with the format, so that what the envelope refuses to publish
    (``UnpublishableEvent``) is handled like a schema violation of an output."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnpublishableEvent(SchemaViolation):
    """An event the format cannot carry: NaN in JSON, a lone surrogate in a header."""


def valid_traceparent(value: str) -> bool:
    """W3C trace context rules: version ff, an all-zero trace or parent id are invalid."""
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return False
    version, trace, parent, _, rest = match.groups()
    if version == "ff" or trace == _ZERO_TRACE or parent == _ZERO_SPAN:
        return False
    return version != "00" or rest is None


def child_traceparent(parent: str | None) -> str:
    """A W3C traceparent for the next hop: same trace, new span (a new trace if none or invalid).

    The next hop gets version 00, the one version this runtime writes."""
    span = secrets.token_hex(8)
    if parent is None or not valid_traceparent(parent):
        return f"00-{secrets.token_hex(16)}-{span}-01"
    _, trace, _, flags = parent.split("-")[:4]
    return f"00-{trace}-{span}-{flags}"


def _media(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def is_json(content_type: str | None) -> bool:
    """Troupe treats a missing content type as JSON, the common case between agents."""
    if content_type is None:
        return True
    media = _media(content_type)
    return media in (JSON_CONTENT_TYPE, "text/json") or media.endswith("+json")


def is_text(content_type: str | None) -> bool:
    """``text/*`` (but JSON): data a handler gets as ``str``."""
    return (
        content_type is not None
        and not is_json(content_type)
        and _media(content_type).startswith("text/")
    )


def charset(content_type: str | None) -> str:
    """The ``charset`` parameter of ``content_type``; UTF-8 when it names none."""
    for parameter in (content_type or "").split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"'):
            return value.strip().strip('"')
    return DEFAULT_CHARSET


def _forbidden(name: str, value: str) -> str | None:
    found = _FORBIDDEN_CHAR.search(value)
    if found is None:
        return None
    return (
        f"attribute {name} holds U+{ord(found.group()):04X} at index {found.start()}; "
        "CloudEvents strings carry no control characters or lone surrogates"
    )


def extension_problem(name: object, value: object) -> str | None:
    """Why ``name: value`` cannot be an extension attribute of an event Troupe emits, or None.

    Names are lower-case letters and digits, at most 20, and not an attribute the envelope
    already sets; values are strings (no control characters, at most
    ``MAX_EXTENSION_VALUE_BYTES``), 32-bit integers or booleans."""
    if not isinstance(name, str) or not _ATTRIBUTE_NAME.fullmatch(name):
        return f"extension name {name!r} is not lower-case letters and digits"
    if len(name) > MAX_EXTENSION_NAME_LENGTH:
        return f"extension name {name!r} is longer than {MAX_EXTENSION_NAME_LENGTH} characters"
    if name in CloudEvent.model_fields or name in _STRUCTURED_DATA_KEYS:
        return f"extension name {name!r} is an attribute the runtime sets itself"
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if value not in _INTEGER_RANGE:
            return f"extension {name}: {value} does not fit a CloudEvents 32-bit integer"
        return None
    if isinstance(value, str):
        if len(value.encode("utf-8", "surrogatepass")) > MAX_EXTENSION_VALUE_BYTES:
            return f"extension {name}: longer than {MAX_EXTENSION_VALUE_BYTES} bytes"
        return _forbidden(name, value)
    return (
        f"extension {name} is a {type(value).__name__}; extensions are strings, integers "
        "or booleans (a decimal as a string)"
    )


class CloudEvent(BaseModel):
    """One CloudEvent; ``data`` is decoded JSON, ``str`` for text, ``bytes`` for the rest."""

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
    traceparent: str | None = None
    replyto: str | None = Field(default=None, min_length=1)
    sessionid: str | None = Field(
        default=None, pattern=SESSION_ID_PATTERN, max_length=SESSION_ID_MAX
    )
    data: Any = None

    @field_validator("traceparent", mode="before")
    @classmethod
    def _drop_invalid_traceparent(cls, value: Any) -> Any:
        """An invalid trace context is dropped (W3C): the hop starts a new trace."""
        if isinstance(value, str) and valid_traceparent(value):
            return value
        return None

    @model_validator(mode="after")
    def _attributes_are_cloudevents_values(self) -> CloudEvent:
        if self.datacontenttype is not None and not _MEDIA_TYPE.fullmatch(self.datacontenttype):
            raise ValueError("datacontenttype is a media type: printable ASCII only")
        for name, value in self._attribute_items():
            if isinstance(value, str):
                if (problem := _forbidden(name, value)) is not None:
                    raise ValueError(problem)
            elif not isinstance(value, int | bytes | datetime):
                raise ValueError(
                    f"attribute {name} is a {type(value).__name__}; CloudEvents attributes are "
                    "strings, integers, booleans, binary or timestamps"
                )
        return self

    def _attribute_items(self) -> list[tuple[str, Any]]:
        fields = [(name, getattr(self, name)) for name in type(self).model_fields if name != "data"]
        extras = list((self.model_extra or {}).items())
        return [(name, value) for name, value in fields + extras if value is not None]

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
        extensions: Mapping[str, Any] | None = None,
    ) -> CloudEvent:
        """The ``index``-th event caused by this one, with a deterministic id.

        The id depends only on ``scope`` (who produces it), the input's source
        and id, and ``index``: a redelivered input yields the same ids again.
        ``traceparent`` defaults to a new span in this event's trace. Text or
        bytes in answer to non-JSON data keep the input's content type.
        ``extensions`` are extension attributes (see ``extension_problem``).
        """
        for name, value in (extensions or {}).items():
            if (problem := extension_problem(name, value)) is not None:
                raise UnpublishableEvent(problem)
        digest = hashlib.sha256(f"{scope}\n{self.source}\n{self.id}\n{index}".encode())
        if traceparent is None or not valid_traceparent(traceparent):
            traceparent = child_traceparent(self.traceparent)
        try:
            return CloudEvent(
                id=digest.hexdigest()[:32],
                source=source,
                type=type,
                time=datetime.now(UTC),
                datacontenttype=answer_content_type(self.datacontenttype, data),
                priority=self.priority,
                correlationid=self.run_id,
                causationid=self.id,
                deadline=self.deadline,
                traceparent=traceparent,
                data=data,
                **(extensions or {}),
            )
        except ValidationError as error:
            raise UnpublishableEvent(
                f"the {type!r} event is not a valid CloudEvent: {_describe(error)}"
            ) from error


def workflow_of(event: CloudEvent) -> str | None:
    """The Workflow ``event`` belongs to (its ``troupeworkflow``), when that is a Workflow's
    name (a DNS label); anything else is dropped, not carried on: a sender's junk must not
    reach a budget's key or another agent's events."""
    value = (event.model_extra or {}).get(WORKFLOW_ATTRIBUTE)
    if (
        isinstance(value, str)
        and len(value) <= DNS_LABEL_MAX
        and re.fullmatch(DNS_LABEL_PATTERN, value) is not None
    ):
        return value
    return None


def workflow_extension(cause: CloudEvent) -> dict[str, Any]:
    """What an event sent for ``cause`` carries of it besides the envelope's own attributes:
    its Workflow (``workflow_of``), like its correlation id."""
    workflow = workflow_of(cause)
    return {} if workflow is None else {WORKFLOW_ATTRIBUTE: workflow}


def answer_content_type(cause: str | None, data: Any) -> str:
    """The content type of ``data`` sent in answer to data of type ``cause``."""
    if isinstance(data, bytes | str) and cause is not None and not is_json(cause):
        return cause
    return OCTET_STREAM if isinstance(data, bytes) else JSON_CONTENT_TYPE


def _describe(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or 'event'}: {item['msg']}"
        for item in error.errors()
    )


# -- JSON, bounded ------------------------------------------------------------------


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range for a 64-bit float")
    return value


def refuse_json_constant(name: str) -> float:
    """For ``json.loads``: NaN and Infinity, which Python reads, are not JSON."""
    raise ValueError(f"{name} is not a JSON number")


def _nests_deeper(value: Any, depth: int) -> bool:
    """Whether ``value`` has more than ``depth`` levels of arrays and objects (no recursion)."""
    if depth < 1:
        return True
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                if level >= depth:
                    return True
                if child:  # an empty one adds its level, checked above, and nothing below
                    stack.append((child, level + 1))
    return False


def decode_json(text: bytes, depth: int, what: str) -> Any:
    """Decode JSON ``text`` of at most ``depth`` levels; ``what`` names it in the reason."""
    try:
        value = json.loads(text, parse_float=_finite_float, parse_constant=refuse_json_constant)
    except RecursionError:
        raise MalformedMessage(f"{what} nests deeper than the limit of {depth} levels") from None
    except ValueError as error:
        raise MalformedMessage(f"{what} is not valid JSON: {error}") from error
    # Depth is at most the number of opening brackets: most payloads need no walk.
    brackets = text.count(b"[") + text.count(b"{")
    if isinstance(value, dict | list) and brackets > depth and _nests_deeper(value, depth):
        raise MalformedMessage(f"{what} nests deeper than the limit of {depth} levels")
    return value


def _pointer(path: tuple[Any, ...]) -> str:
    return "/" + "/".join(str(part) for part in path) if path else "(root)"


def _scalar_problem(value: Any) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value!r}, which JSON cannot carry (no NaN or Infinity)"
    if value is None or isinstance(value, str | int | float):
        return None
    return f"a {type(value).__name__}, which JSON cannot represent"


def json_problem(value: Any, depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why ``value`` cannot be published as JSON, or None: a walk with no recursion."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            items: Any = node.items()
            for key in node:
                if (problem := _scalar_problem(key)) is not None:
                    return f"has a key that is {problem} at {_pointer(path)}"
        elif isinstance(node, list | tuple):
            items = enumerate(node)
        else:
            problem = _scalar_problem(node)
            if problem is not None:
                return f"holds {problem} at {_pointer(path)}"
            continue
        if len(path) >= depth:
            return f"nests deeper than the limit of {depth} levels at {_pointer(path)}"
        for key, child in items:
            if isinstance(child, dict | list | tuple):
                stack.append((child, (*path, key)))
            elif (problem := _scalar_problem(child)) is not None:
                return f"holds {problem} at {_pointer((*path, key))}"
    return None


def encode_json(data: Any) -> bytes:
    """``data`` as compact JSON; ``UnpublishableEvent`` for what JSON cannot carry."""
    problem = json_problem(data)
    if problem is not None:
        raise UnpublishableEvent(f"data {problem}")
    try:
        return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as error:
        raise UnpublishableEvent(f"data cannot be encoded as JSON: {error}") from error


# -- header values ------------------------------------------------------------------


def percent_encode(value: str) -> str:
    """A header value as the HTTP binding writes it: UTF-8 bytes of unsafe characters as %XX."""
    if _HEADER_SAFE.fullmatch(value):
        return value
    if _SURROGATE.search(value):
        try:  # a surrogate pair held as two code points is one character
            value = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
        except UnicodeDecodeError as error:
            raise UnpublishableEvent(
                f"a header value holds a lone surrogate at index {error.start // 2}, "
                "which UTF-8 cannot carry"
            ) from error
    return "".join(
        char if char in _SAFE_CHARS else "".join(f"%{byte:02X}" for byte in char.encode())
        for char in value
    )


def _unquoted(value: str) -> str:
    """The content of a value that is one RFC 7230 quoted-string; other values as they are."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    out: list[str] = []
    index, end = 1, len(value) - 1
    while index < end:
        char = value[index]
        if char == "\\":
            if index + 1 == end:
                return value  # the closing quote is escaped: not a quoted-string
            out.append(value[index + 1])
            index += 2
            continue
        if char == '"':
            return value  # more than one quoted-string: take it literally
        out.append(char)
        index += 1
    return "".join(out)


def percent_decode(value: str, header: str) -> str:
    """A header value as the HTTP binding reads it: unquoted, then one round of %XX."""
    text = _unquoted(value)
    if "%" not in text:
        return text
    raw = unquote_to_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MalformedMessage(
            f"header {header} is not UTF-8 once percent-decoded ({error.reason} at byte "
            f"{error.start}); percent-encode the UTF-8 bytes of each character"
        ) from error


def _header_value(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


# -- reading ------------------------------------------------------------------------


def _validated(attributes: dict[str, Any]) -> CloudEvent:
    try:
        return CloudEvent.model_validate(attributes)
    except ValidationError as error:
        raise MalformedMessage(f"not a CloudEvent: {_describe(error)}") from error


def _check_name(name: str, where: str) -> None:
    if not _ATTRIBUTE_NAME.fullmatch(name):
        raise MalformedMessage(
            f"not a CloudEvent: {where} {name!r} is no attribute name "
            "(CloudEvents attribute names are lower-case letters and digits)"
        )


def _decode_text(payload: bytes, content_type: str) -> str:
    name = charset(content_type)
    try:
        return payload.decode(name)
    except LookupError as error:
        raise MalformedMessage(
            f"data has charset {name[:40]!r}, which is no known text encoding"
        ) from error
    except UnicodeDecodeError as error:
        raise MalformedMessage(
            f"data is not valid {name} text ({error.reason} at byte {error.start})"
        ) from error


def decode_data(payload: bytes, content_type: str | None, limits: Limits = DEFAULT_LIMITS) -> Any:
    """The payload as a handler sees it: JSON decoded, text as ``str``, others as ``bytes``.

    An empty payload is no data (None), whatever the type."""
    if not payload:
        return None
    if is_json(content_type):
        return decode_json(payload, limits.json_depth, "data")
    if content_type is not None and is_text(content_type):
        return _decode_text(payload, content_type)
    return payload


def _from_structured(content_type: str | None, payload: bytes, limits: Limits) -> CloudEvent:
    if content_type is not None and _media(content_type) == BATCH_CONTENT_TYPE:
        raise MalformedMessage(
            f"not a CloudEvent: batched mode ({BATCH_CONTENT_TYPE}) is not supported; "
            "send one event per message"
        )
    # The event object is one level; its data may nest as deep as binary-mode data.
    body = decode_json(payload, limits.json_depth + 1, "not a CloudEvent: body")
    if not isinstance(body, dict) or "specversion" not in body:
        raise MalformedMessage(
            "not a CloudEvent: no ce-specversion header and no specversion in a JSON body"
        )
    for key in body:
        if key not in _STRUCTURED_DATA_KEYS:
            _check_name(key, "member")
    if "data_base64" in body:
        if "data" in body:
            raise MalformedMessage(
                "not a CloudEvent: it has both data and data_base64; the JSON format allows one"
            )
        encoded = body.pop("data_base64")
        if not isinstance(encoded, str):
            raise MalformedMessage("data_base64 is not base64: it is not a string")
        try:
            body["data"] = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as error:
            raise MalformedMessage(f"data_base64 is not base64: {error}") from error
    return _validated(body)


def _content_type(attribute: str | None, header: str | None) -> str | None:
    """``ce-datacontenttype`` or ``content-type``: one of them, or both saying the same."""
    if attribute is None or header is None:
        return attribute if attribute is not None else header
    if _media(attribute) != _media(header):
        raise MalformedMessage(
            f"not a CloudEvent: content-type {header[:100]!r} and ce-datacontenttype "
            f"{attribute[:100]!r} disagree; send one of them, or the same in both"
        )
    return attribute


def _from_binary(headers: dict[str, str], payload: bytes, limits: Limits) -> CloudEvent:
    attributes: dict[str, Any] = {}
    for key, value in headers.items():
        if not key.startswith(HEADER_PREFIX):
            continue
        name = key.removeprefix(HEADER_PREFIX)
        _check_name(name, "header ce-")
        if name == "data":
            raise MalformedMessage(
                "not a CloudEvent: a ce-data header; in binary mode the data is the payload"
            )
        attributes[name] = percent_decode(value, key)
    content_type = _content_type(
        attributes.get("datacontenttype"), headers.get(CONTENT_TYPE_HEADER)
    )
    if content_type is not None:
        attributes["datacontenttype"] = content_type
    event = _validated(attributes)
    return event.model_copy(update={"data": decode_data(payload, content_type, limits)})


def _lowered(headers: Mapping[str, str]) -> dict[str, str]:
    lowered: dict[str, str] = {}
    names: dict[str, str] = {}
    for key, value in headers.items():
        name = key.lower()
        if name in lowered:
            raise MalformedMessage(
                f"headers {names[name][:100]!r} and {key[:100]!r} are one header "
                "(names are case-insensitive); send it once"
            )
        lowered[name] = value
        names[name] = key
    return lowered


def parse(
    headers: Mapping[str, str] | None, payload: bytes, limits: Limits = DEFAULT_LIMITS
) -> CloudEvent:
    """Read a CloudEvent from a NATS message's headers and payload, in either mode.

    Raises ``MalformedMessage`` with the precise reason, and nothing else."""
    headers = headers or {}
    too_large = oversize(headers, payload, limits)
    if too_large is not None:
        raise MalformedMessage(too_large)
    lowered = _lowered(headers)
    if SPECVERSION_HEADER not in lowered:
        return _from_structured(lowered.get(CONTENT_TYPE_HEADER), payload, limits)
    return _from_binary(lowered, payload, limits)


# -- writing ------------------------------------------------------------------------


def _encode_text(text: str, content_type: str | None) -> bytes:
    name = charset(content_type)
    try:
        return text.encode(name)
    except LookupError as error:
        raise UnpublishableEvent(
            f"datacontenttype names charset {name[:40]!r}, which is no known text encoding"
        ) from error
    except UnicodeEncodeError as error:
        raise UnpublishableEvent(
            f"data holds U+{ord(text[error.start]):04X} at index {error.start}, "
            f"which {name} cannot encode"
        ) from error


def encode_data(event: CloudEvent) -> bytes:
    """The payload of ``event`` in binary mode."""
    data = event.data
    if data is None:
        return b""
    if isinstance(data, bytes):
        return data
    if not is_json(event.datacontenttype):
        if isinstance(data, str):
            return _encode_text(data, event.datacontenttype)
        raise UnpublishableEvent(
            f"data of type {event.datacontenttype} must be str or bytes, "
            f"not a {type(data).__name__}"
        )
    return encode_json(data)


def to_binary(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """Headers and payload of ``event`` in binary mode, ready to publish.

    ``datacontenttype`` goes both as ``content-type`` (for NATS tools and the
    HTTP-minded) and as ``ce-datacontenttype`` (for CloudEvents SDKs)."""
    payload = encode_data(event)
    attributes = event.model_dump(exclude={"data"}, exclude_none=True)
    headers: dict[str, str] = {}
    for name, value in attributes.items():
        try:
            headers[f"{HEADER_PREFIX}{name}"] = percent_encode(_header_value(value))
        except UnpublishableEvent as error:
            raise UnpublishableEvent(f"attribute {name}: {error.reason}") from error
    if event.datacontenttype is not None:
        headers[CONTENT_TYPE_HEADER] = event.datacontenttype
    return headers, payload
