"""Typed errors of the shared-state API, each naming the bucket, the key and what to do."""

from __future__ import annotations

from collections.abc import Iterable


class StateError(Exception):
    """Base of every shared-state error, so a handler can catch them all at once."""


class UnknownBucketError(StateError, LookupError):
    """The handler asked for a bucket its Agent does not declare."""

    def __init__(self, name: str, agent: str, declared: Iterable[str]) -> None:
        self.name = name
        self.declared = sorted(declared)
        listed = ", ".join(self.declared) or "none"
        super().__init__(
            f"agent {agent} does not declare state bucket {name!r} (declared: {listed}); "
            f"add it to the Agent's spec.state"
        )


class BucketNotProvisionedError(StateError):
    """The bucket is declared but missing in JetStream: the operator has not created it yet."""

    def __init__(self, name: str, stream_bucket: str) -> None:
        self.name = name
        super().__init__(
            f"state bucket {name!r} is declared but JetStream bucket {stream_bucket!r} "
            f"does not exist; check that the operator reconciled the Agent"
        )


class ReadOnlyBucketError(StateError, PermissionError):
    """A write to a bucket the Agent declares with ``access: ReadOnly``."""

    def __init__(self, bucket: str, key: str) -> None:
        self.bucket = bucket
        self.key = key
        super().__init__(
            f"state bucket {bucket!r} is ReadOnly for this agent, so key {key!r} cannot be "
            f"written; declare it with access: ReadWrite in the Agent's spec.state"
        )


class KeyExistsError(StateError):
    """``create`` found the key already present."""

    def __init__(self, bucket: str, key: str, revision: int | None) -> None:
        self.bucket = bucket
        self.key = key
        self.revision = revision
        super().__init__(
            f"key {key!r} already exists in state bucket {bucket!r} (revision {revision}); "
            f"use put or update to change it"
        )


class ConflictError(StateError):
    """A compare-and-set lost: the key changed since it was read."""

    def __init__(
        self, bucket: str, key: str, expected: int, actual: int | None, attempts: int = 1
    ) -> None:
        self.bucket = bucket
        self.key = key
        self.expected = expected
        self.actual = actual
        self.attempts = attempts
        super().__init__(
            f"key {key!r} in state bucket {bucket!r} changed concurrently: expected revision "
            f"{expected}, found {'unknown' if actual is None else actual}"
            f" after {attempts} attempt(s)"
        )


class LockTimeoutError(StateError, TimeoutError):
    """The lease on a key stayed held by another writer for longer than the lock wait."""

    def __init__(self, bucket: str, key: str, lease_revision: int | None, waited: float) -> None:
        self.bucket = bucket
        self.key = key
        self.lease_revision = lease_revision
        super().__init__(
            f"key {key!r} in state bucket {bucket!r} stayed locked by another writer for "
            f"{waited:.1f}s; a crashed holder's lease expires on its own after its TTL"
        )


class InvalidValueError(StateError, ValueError):
    """A value that is not JSON: state values are JSON so every language can read them."""
