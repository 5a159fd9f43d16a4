r"""What a JSON Schema must be for the runtime to run it: one judgement, shared.

The runtime compiles an Agent's schemas when it starts (``troupe_runtime.agent.schemas``)
and the operator judges them before it writes anything (``builders.validation``); both call
``schema_problem``, so what the operator accepts is exactly what the runtime runs. A schema
passes when, checked in this order:

- its ``$schema`` names a dialect jsonschema knows (an unknown one falls back to the latest
  draft with a deprecation warning today, and will be an error tomorrow); none means 2020-12;
- every pattern compiles with RE2, the linear-time engine the runtime matches with, and
  ``unevaluatedProperties`` never sits beside ``patternProperties`` (jsonschema would match
  those patterns with ``re``);
- it is valid against that dialect's metaschema, whose ``regex`` format is RE2's too (not
  Python's ``re``, which would refuse ``\\p{L}`` and accept lookarounds);
- every ``$ref`` and ``$dynamicRef`` resolves inside the schema or to an official metaschema.
  Nothing is fetched over the network: validation that depends on a remote server is slow,
  fails when that server does, and lets a manifest make every pod send requests anywhere;
- it nests at most ``MAX_SCHEMA_DEPTH`` levels: a fixed bound, so that the operator and
  the runtime agree whatever their stacks (Python's recursion limit would not).

Each problem carries the JSON pointer (RFC 6901) of the place inside the schema at fault.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema_specifications  # type: ignore[import-untyped]
import re2  # type: ignore[import-untyped]
import referencing.jsonschema
from jsonschema import FormatChecker
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable

MAX_SCHEMA_DEPTH = 64
"""Nested objects and arrays in a schema document, as for data (``limits.MAX_JSON_DEPTH``):
far beyond a real schema, far below where checking it would hit the recursion limit."""
MAX_DETAIL_CHARS = 300
"""A metaschema error can quote a whole subschema; a status message needs the gist."""

OFFLINE_REGISTRY: Registry[Any] = jsonschema_specifications.REGISTRY
"""What a ``$ref`` may reach besides the schema itself: the official metaschemas only."""

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


@dataclass(frozen=True)
class SchemaProblem:
    """Why the runtime cannot run a schema, and where inside it."""

    pointer: str
    """RFC 6901, relative to the schema: ``""`` is the schema itself."""
    message: str

    def sentence(self) -> str:
        return f"{self.message} (at {self.pointer or 'the root'})"


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> Any:
    """``pattern`` compiled by RE2; raises ``re2.error`` (or ``TypeError``) if it cannot be."""
    return re2.compile(pattern, _RE2_OPTIONS)


def pointer(parts: Iterator[Any] | list[Any] | tuple[Any, ...]) -> str:
    """The RFC 6901 pointer of a path of keys and indexes."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def dialect(schema: Mapping[str, Any]) -> type[Validator] | None:
    """The validator class for ``schema``'s ``$schema`` (2020-12 without one), or None."""
    if "$schema" not in schema:
        return validator_for(schema)
    if not isinstance(schema["$schema"], str):
        return None
    return validator_for(schema, default=None)  # type: ignore[arg-type]


def schema_problem(schema: dict[str, Any]) -> SchemaProblem | None:
    """The first reason the runtime would refuse ``schema`` at start-up, or None."""
    try:
        return _problem(schema)
    except RecursionError:
        return SchemaProblem(
            "", "nests too deep to be checked; flatten it, e.g. with $defs and $ref"
        )


def _problem(schema: dict[str, Any]) -> SchemaProblem | None:
    if (deep := _too_deep(schema)) is not None:
        return SchemaProblem(
            pointer(deep),
            f"nests deeper than {MAX_SCHEMA_DEPTH} levels; flatten it, e.g. with $defs and $ref",
        )
    cls = dialect(schema)
    if cls is None:
        return SchemaProblem(
            "/$schema",
            f"$schema {schema['$schema']!r} is not a JSON Schema dialect the runtime knows; "
            "use e.g. https://json-schema.org/draft/2020-12/schema",
        )
    if (problem := _pattern_problem(schema)) is not None:
        return problem
    if (error := best_match(_metaschema_validator(cls).iter_errors(schema))) is not None:
        return SchemaProblem(
            pointer(list(error.path)), f"not a valid JSON Schema: {_shortened(error.message)}"
        )
    return _reference_problem(schema, cls)


def _is_re2(instance: object) -> bool:
    if isinstance(instance, str):
        compile_pattern(instance)
    return True


@functools.cache
def _metaschema_validator(cls: type[Validator]) -> Validator:
    """What ``cls.check_schema`` uses, but with ``regex`` meaning what the runtime runs."""
    checker = FormatChecker(formats=())
    checker.checkers = {
        **cls.FORMAT_CHECKER.checkers,
        "regex": (_is_re2, (re2.error, UnicodeEncodeError, TypeError)),
    }
    return validator_for(cls.META_SCHEMA)(cls.META_SCHEMA, format_checker=checker)


def _shortened(text: str) -> str:
    return text if len(text) <= MAX_DETAIL_CHARS else f"{text[:MAX_DETAIL_CHARS]}..."


def _too_deep(schema: Any) -> tuple[Any, ...] | None:
    """The path to the first container nested deeper than ``MAX_SCHEMA_DEPTH``, if any."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), schema)]
    while stack:
        path, node = stack.pop()
        children = node.items() if isinstance(node, Mapping) else enumerate(node)
        if len(path) >= MAX_SCHEMA_DEPTH:
            return path
        stack.extend(
            ((*path, key), child) for key, child in children if isinstance(child, dict | list)
        )
    return None


def _walk(schema: Any) -> Iterator[tuple[tuple[Any, ...], Mapping[str, Any]]]:
    """Every object in a schema document with its path (no recursion: schemas may nest
    deeply). Every object, not only subschemas: the runtime's RE2 check has always been
    this strict, and a ``pattern`` key inside ``const`` or ``default`` is rare."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), schema)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, Mapping):
            yield path, node
            stack.extend(((*path, key), value) for key, value in reversed(list(node.items())))
        elif isinstance(node, list):
            stack.extend(((*path, index), item) for index, item in reversed(list(enumerate(node))))


def _pattern_problem(schema: Mapping[str, Any]) -> SchemaProblem | None:
    unevaluated: tuple[Any, ...] | None = None
    found_pattern_properties = False
    for path, node in _walk(schema):
        patterns: list[tuple[tuple[Any, ...], Any]] = []
        if isinstance(node.get("pattern"), str):
            patterns.append(((*path, "pattern"), node["pattern"]))
        if isinstance(node.get("patternProperties"), Mapping):
            patterns.extend(
                ((*path, "patternProperties", key), key) for key in node["patternProperties"]
            )
            found_pattern_properties = True
        if unevaluated is None and "unevaluatedProperties" in node:
            unevaluated = (*path, "unevaluatedProperties")
        for where, pattern in patterns:
            try:
                compile_pattern(pattern)
            except (re2.error, UnicodeEncodeError, TypeError) as error:
                detail = error.args[0] if error.args else error
                if isinstance(detail, bytes):
                    detail = detail.decode(errors="replace")
                return SchemaProblem(
                    pointer(where),
                    f"pattern {pattern!r} is not supported ({detail}); the runtime matches "
                    "patterns with RE2, which has no lookaround or backreferences",
                )
    if unevaluated is not None and found_pattern_properties:
        return SchemaProblem(
            pointer(unevaluated),
            "unevaluatedProperties together with patternProperties is not supported; "
            "use additionalProperties (the runtime matches patterns in linear time only there)",
        )
    return None


def _reference_problem(schema: Mapping[str, Any], cls: type[Validator]) -> SchemaProblem | None:
    """The first ``$ref`` or ``$dynamicRef`` that resolves nowhere the runtime may look."""
    paths = {id(node): path for path, node in _walk(schema)}
    specification = referencing.jsonschema.specification_with(
        cls.META_SCHEMA["$id"], default=referencing.jsonschema.DRAFT202012
    )
    root: Resource[Any] = specification.create_resource(schema)
    registry = OFFLINE_REGISTRY.with_resource(root.id() or "", root).crawl()
    stack = [(root, registry.resolver(base_uri=root.id() or ""))]
    while stack:
        resource, resolver = stack.pop()
        contents = resource.contents
        if isinstance(contents, Mapping):
            for keyword in ("$ref", "$dynamicRef"):
                reference = contents.get(keyword)
                if not isinstance(reference, str):
                    continue
                try:
                    resolver.lookup(reference)
                except Unresolvable:
                    return SchemaProblem(
                        pointer((*paths.get(id(contents), ()), keyword)),
                        f"{keyword} {reference!r} does not resolve: the runtime resolves "
                        "references within the schema and to the official metaschemas, and "
                        "fetches nothing over the network",
                    )
        stack.extend((sub, resolver.in_subresource(sub)) for sub in resource.subresources())
    return None
