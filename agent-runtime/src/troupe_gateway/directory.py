"""The operator's directory of a namespace's Agents and Workflows, as the gateway reads it.

STUB (issue 14): signatures agreed in /work/issue14-common.md; helper G1 implements (a lazy
KV watch per namespace, so a lookup on the hot path is a dict read).
"""

from __future__ import annotations

from troupe_runtime.contract.gateway import DirectoryEntry, TargetKind


class Directory:
    async def entry(self, namespace: str, kind: TargetKind, name: str) -> DirectoryEntry | None:
        raise NotImplementedError

    async def entries(self, namespace: str) -> list[DirectoryEntry]:
        raise NotImplementedError
