"""The few Kubernetes API calls the gateway makes, async over httpx: TokenReview,
SubjectAccessReview and Secrets. In a pod: the ServiceAccount's token and CA; elsewhere the
file ``KUBECONFIG`` names (its current context).

STUB (issue 14): signatures agreed in /work/issue14-common.md; helper G4 implements.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Review:
    """A TokenReview's or SubjectAccessReview's answer."""

    ok: bool
    user: str = ""
    groups: tuple[str, ...] = ()
    reason: str = ""


class Kube:
    async def token_review(self, token: str) -> Review:
        raise NotImplementedError

    async def access_review(
        self,
        user: str,
        groups: tuple[str, ...],
        *,
        namespace: str,
        verb: str,
        group: str,
        resource: str,
        name: str,
    ) -> Review:
        raise NotImplementedError

    async def secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """The Secret's data, decoded; None when there is none."""
        raise NotImplementedError

    async def secrets(
        self, namespace: str, label_selector: str
    ) -> list[tuple[str, dict[str, str], dict[str, bytes]]]:
        """``(name, annotations, data)`` of each Secret the selector picks."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError
