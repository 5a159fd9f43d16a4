"""An A2A v1.0 agent card per Agent and per Workflow, from its directory entry: pure, no I/O.

**What a card says.** The name is the object's; the description its role (the operator's
entry: role, a blank line, the spec's description); the version its ``metadata.generation``.
One skill per target (a Troupe target does one thing: take its input, give its output): its
description is the entry's first paragraph plus the input schema as compact JSON, its
``examples`` apart (A2A has no field for a skill's input, and a client or a model picks and
calls a skill from its text), or the schema's top-level property names when it is too long.
Tags are ``troupe``, the kind, and the schema's top-level property names; examples are the
schema's ``examples``, each as compact JSON. Streaming is on for an LLM agent that streams
and for every Workflow (its step events); push notifications are on. Both bindings, JSON-RPC
and HTTP+JSON, are at the same absolute URL,
``{public url}/a2a/{namespace}/{agents|workflows}/{name}``. The security schemes are a
bearer token (a Kubernetes token, TokenReview) and an API key in ``X-API-Key``; either one
will do.

**Hostile entries.** The entry is the operator's, but its text is a user's spec: every
string is cut to a bound (a megabyte of description makes a card of a few kilobytes), lone
surrogates are replaced (protobuf refuses them), and a schema of any shape (a ``title``
that is a number, ``examples`` that are not a list, nesting too deep to print) gives a card.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Final

from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentProvider,
    AgentSkill,
    APIKeySecurityScheme,
    HTTPAuthSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
    StringList,
)
from a2a.utils.constants import PROTOCOL_VERSION_1_0, TransportProtocol

from troupe_runtime.contract.gateway import DirectoryEntry, TargetKind

PATH_KINDS: Final[dict[TargetKind, str]] = {"Agent": "agents", "Workflow": "workflows"}
INPUT_MODES: Final = ("application/json", "text/plain")
OUTPUT_MODES: Final = ("application/json", "text/plain")
BEARER: Final = "bearer"
API_KEY: Final = "apiKey"
API_KEY_HEADER: Final = "X-API-Key"

NAME_MAX: Final = 253
DESCRIPTION_MAX: Final = 4000
SKILL_DESCRIPTION_MAX: Final = 4000
SCHEMA_IN_DESCRIPTION_MAX: Final = 2000
TAG_MAX: Final = 64
TAGS_MAX: Final = 12
EXAMPLE_MAX: Final = 2000
EXAMPLES_MAX: Final = 5
ELLIPSIS: Final = "…"


def target_path(kind: TargetKind, namespace: str, name: str) -> str:
    """The A2A base path of a target (card, JSON-RPC and HTTP+JSON live beneath it)."""
    return f"/a2a/{namespace}/{PATH_KINDS[kind]}/{name}"


def bounded(text: str, limit: int) -> str:
    """``text`` as protobuf takes it (lone surrogates replaced), cut to ``limit`` characters."""
    clean = text.encode("utf-8", "replace").decode("utf-8")
    return clean if len(clean) <= limit else clean[: limit - len(ELLIPSIS)] + ELLIPSIS


def _compact(value: Any) -> str | None:
    """Compact JSON, or None for what JSON cannot say (NaN, nesting too deep to print)."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return None


def _properties(schema: dict[str, Any] | None) -> list[str]:
    properties = (schema or {}).get("properties")
    if not isinstance(properties, dict):
        return []
    return [key for key in properties if isinstance(key, str) and key][:TAGS_MAX]


def _first_paragraph(description: str) -> str:
    return description.strip().split("\n\n", 1)[0].strip()


def _description(entry: DirectoryEntry) -> str:
    text = entry.description.strip()
    if not text:
        text = f"Troupe {entry.kind} {entry.name} in namespace {entry.namespace}."
    return bounded(text, DESCRIPTION_MAX)


def _skill_description(entry: DirectoryEntry) -> str:
    schema = entry.input_schema
    own = schema.get("description") if schema else None
    head = own.strip() if isinstance(own, str) and own.strip() else ""
    head = head or _first_paragraph(entry.description) or _description(entry)
    head = bounded(head, SKILL_DESCRIPTION_MAX - SCHEMA_IN_DESCRIPTION_MAX - 64)
    if schema is None:
        return f"{head}\n\nInput: any JSON value (a data part), or text."
    printed = _compact({key: value for key, value in schema.items() if key != "examples"})
    if printed is not None and len(printed) <= SCHEMA_IN_DESCRIPTION_MAX:
        return bounded(f"{head}\n\nInput JSON Schema: {printed}", SKILL_DESCRIPTION_MAX)
    fields = ", ".join(bounded(name, TAG_MAX) for name in _properties(schema))
    summary = f"Input: a JSON object with {fields}." if fields else "Input: see the contract."
    return bounded(f"{head}\n\n{summary}", SKILL_DESCRIPTION_MAX)


def _tags(entry: DirectoryEntry) -> list[str]:
    tags = ["troupe", entry.kind.lower()]
    for name in _properties(entry.input_schema):
        tag = bounded(name, TAG_MAX)
        if tag not in tags:
            tags.append(tag)
    return tags[:TAGS_MAX]


def _examples(schema: dict[str, Any] | None) -> list[str]:
    examples = (schema or {}).get("examples")
    if not isinstance(examples, list):
        return []
    printed = (_compact(example) for example in examples[: EXAMPLES_MAX * 4])
    return [text for text in printed if text is not None and len(text) <= EXAMPLE_MAX][
        :EXAMPLES_MAX
    ]


def _skill_name(entry: DirectoryEntry) -> str:
    title = (entry.input_schema or {}).get("title")
    if isinstance(title, str) and title.strip():
        return bounded(title.strip(), NAME_MAX)
    return bounded(entry.name, NAME_MAX)


def _interfaces(url: str) -> Iterable[AgentInterface]:
    for binding in (TransportProtocol.JSONRPC, TransportProtocol.HTTP_JSON):
        yield AgentInterface(
            url=url, protocol_binding=binding.value, protocol_version=PROTOCOL_VERSION_1_0
        )


def security_schemes() -> dict[str, SecurityScheme]:
    """How to authenticate: either scheme; ``invoke`` on the object is then RBAC's to grant."""
    return {
        BEARER: SecurityScheme(
            http_auth_security_scheme=HTTPAuthSecurityScheme(
                scheme="Bearer",
                bearer_format="JWT",
                description="A Kubernetes token (a ServiceAccount's), checked by TokenReview; "
                "RBAC must allow the verb invoke on the object (group troupe.dev).",
            )
        ),
        API_KEY: SecurityScheme(
            api_key_security_scheme=APIKeySecurityScheme(
                location="header",
                name=API_KEY_HEADER,
                description="A namespace API key; it acts as its Secret's ServiceAccount.",
            )
        ),
    }


def card(entry: DirectoryEntry, public_url: str) -> AgentCard:
    """The card of ``entry`` as served from the gateway at ``public_url`` (scheme and host,
    optionally a path prefix)."""
    url = public_url.rstrip("/") + target_path(entry.kind, entry.namespace, entry.name)
    skill = AgentSkill(
        id=f"{PATH_KINDS[entry.kind]}/{entry.name}",
        name=_skill_name(entry),
        description=_skill_description(entry),
        tags=_tags(entry),
        examples=_examples(entry.input_schema),
        input_modes=list(INPUT_MODES),
        output_modes=list(OUTPUT_MODES),
    )
    return AgentCard(
        name=bounded(entry.name, NAME_MAX),
        description=_description(entry),
        supported_interfaces=list(_interfaces(url)),
        provider=AgentProvider(organization="Troupe", url=public_url.rstrip("/") or url),
        version=str(entry.generation),
        capabilities=AgentCapabilities(
            streaming=entry.streaming or entry.kind == "Workflow",
            push_notifications=True,
            extended_agent_card=False,
        ),
        security_schemes=security_schemes(),
        security_requirements=[
            SecurityRequirement(schemes={BEARER: StringList()}),
            SecurityRequirement(schemes={API_KEY: StringList()}),
        ],
        default_input_modes=list(INPUT_MODES),
        default_output_modes=list(OUTPUT_MODES),
        skills=[skill],
    )
