"""JSON merge patch (RFC 7386) and the three-way merge built on it. Pure.

The merge policy computes what *we* changed (``diff(base, ours)``) and applies
only that onto what the other writer committed, so their edits to other fields
survive. RFC 7386's limits apply: ``null`` means "remove", arrays are replaced
whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MergeFunction = Callable[[Any, Any, Any], Any]
"""``fn(base, ours, theirs) -> merged``: base is what we read, ours what we wanted to
write, theirs what another writer committed meanwhile."""


def apply_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 MergePatch(target, patch)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = apply_patch(result.get(name), value)
    return result


def diff(base: Any, ours: Any) -> Any:
    """The merge patch that turns ``base`` into ``ours``."""
    if not isinstance(base, dict) or not isinstance(ours, dict):
        return ours
    patch: dict[str, Any] = {name: None for name in base if name not in ours}
    for name, value in ours.items():
        if name not in base:
            patch[name] = value
        elif base[name] != value:
            patch[name] = diff(base[name], value)
    return patch


def three_way_merge(base: Any, ours: Any, theirs: Any) -> Any:
    """Our changes since ``base`` applied onto ``theirs``; on the same field, ours wins."""
    return apply_patch(theirs, diff(base, ours))
