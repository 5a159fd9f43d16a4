"""The API server's refusal of a built object, traced back to the spec field it came from.

The API server names fields of the object it refused (``spec.template.spec.containers[1]
.name``); a person fixes the Agent (``spec.runtime.sidecars[0].name``). Builders copy parts
of the spec into objects unchanged (an env var, a sidecar, a toleration), so the refused
part is found again in the spec by value: the longest prefix of the refused path whose
value the spec holds, verbatim or as the models dump it, names the field. A ConfigMap
holds the whole config built from the spec, so its refusal names the spec.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from troupe_operator.builders.problems import Problem
from troupe_operator.builders.status import OBJECT_REJECTED

SEGMENT = re.compile(r"\[([^\]]*)\]|([^.\[\]]+)")
PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
Path = tuple[str | int, ...]


@dataclass(frozen=True)
class RefusedField:
    """One field the API server named, and what it said about it."""

    path: str
    message: str


def parse_path(path: str) -> Path:
    """``a.b[0][key]`` → ``("a", "b", 0, "key")``."""
    segments: list[str | int] = []
    for index, name in SEGMENT.findall(path):
        if name:
            segments.append(name)
        elif index.isdigit():
            segments.append(int(index))
        else:
            segments.append(index)
    return tuple(segments)


def render_path(path: Path) -> str:
    text = ""
    for segment in path:
        if isinstance(segment, int):
            text += f"[{segment}]"
        elif PLAIN_KEY.match(segment):
            text += f".{segment}" if text else segment
        else:
            text += f"[{segment}]"
    return text


def _at(tree: Any, path: Path) -> Any:
    node = tree
    for segment in path:
        listed = isinstance(segment, int) and isinstance(node, list) and 0 <= segment < len(node)
        mapped = isinstance(segment, str) and isinstance(node, Mapping) and segment in node
        if not (listed or mapped):
            return None
        node = node[segment]
    return node


def _find(tree: Any, value: Any, path: Path = ()) -> Path | None:
    """Where ``tree`` holds ``value``, depth first."""
    if tree == value:
        return path
    children: Sequence[tuple[str | int, Any]] = ()
    if isinstance(tree, Mapping):
        children = list(tree.items())
    elif isinstance(tree, list):
        children = list(enumerate(tree))
    for key, child in children:
        found = _find(child, value, (*path, key))
        if found is not None:
            return found
    return None


def spec_field(manifest: Mapping[str, Any], specs: Sequence[Any], refused: str) -> str:
    """The spec field behind ``refused`` (a field path of ``manifest``), searched in each of
    ``specs`` (the stored spec, then as the models dump it); the object's own path when no
    part of the spec matches."""
    if manifest.get("kind") == "ConfigMap":
        return "spec"
    segments = parse_path(refused)
    for length in range(len(segments), 0, -1):
        node = _at(manifest, segments[:length])
        if not isinstance(node, (Mapping, list)) or not node:
            continue
        for spec in specs:
            found = _find(spec, node)
            if found is not None:
                return render_path(("spec", *found, *segments[length:]))
    name = (manifest.get("metadata") or {}).get("name", "")
    return f"{manifest.get('kind')} {name} {refused}".strip()


def rejection_problems(
    manifest: Mapping[str, Any],
    specs: Sequence[Any],
    message: str,
    refused: Sequence[RefusedField],
) -> list[Problem]:
    """One ``ObjectRejected`` problem per refused field (or one for the whole refusal)."""
    what = f"the API server refused {manifest.get('kind')} {manifest['metadata']['name']}"
    if not refused:
        return [Problem("spec", OBJECT_REJECTED, f"{what}: {message}")]
    return [
        Problem(
            spec_field(manifest, specs, field.path),
            OBJECT_REJECTED,
            f"{what}: {field.message or message}",
        )
        for field in refused
    ]
