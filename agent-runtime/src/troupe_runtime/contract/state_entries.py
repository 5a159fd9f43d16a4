"""What a state key holds as every reader sees it: an entry at a revision, or its absence.

The agents sharing a bucket, the state strategies and ``troupe state`` all read
keys this way; lease keys (``LEASE_PREFIX``) belong to the lock policy and are
hidden from readers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LEASE_PREFIX = "__lock__."


@dataclass(frozen=True)
class Entry:
    """A key's value (JSON, decoded) at a revision."""

    key: str
    value: Any
    revision: int


@dataclass(frozen=True)
class Snapshot:
    """What a compare-and-set must expect: the current entry, or the revision of its absence.

    ``revision`` is 0 for a key never written and the tombstone's revision for a
    deleted one, because JetStream checks the subject's last sequence, tombstones included.
    """

    entry: Entry | None
    revision: int

    @property
    def value(self) -> Any:
        return None if self.entry is None else self.entry.value
