"""Where kopf keeps the spec it last handled: an annotation, with the schemas as digests.

kopf compares each event's spec with the one it last handled, kept in an annotation; the
API server caps all of an object's annotations at 256 KiB together. An Agent's schemas may
be far larger (its ConfigMap holds 1 MiB), and with their full copy every patch kopf makes
is refused: the Agent is handled again and again, and its finalizer can never be removed.
Troupe's passes do not read kopf's diff, only whether the spec changed, so the schemas are
kept as SHA-256 digests: a change still shows, and the copy stays small.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any, cast

import kopf

DIGESTED_FIELDS = (("contract", "inputSchema"), ("contract", "outputSchema"))
"""Spec fields of unbounded size, under ``spec``, kept as digests."""


def digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class DigestedDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's annotation storage, with ``DIGESTED_FIELDS`` replaced by their digests."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        essence = super().build(body=body, extra_fields=extra_fields)
        spec = cast(dict[str, Any], essence).get("spec")
        for parent, name in DIGESTED_FIELDS:
            holder = spec.get(parent) if isinstance(spec, dict) else None
            if isinstance(holder, dict) and holder.get(name) is not None:
                holder[name] = digest(holder[name])
        return essence
