"""Leader election's I/O: the Lease in the API server, and the loops that acquire, renew
and release it (client-go's leaderelection; the rules themselves are ``builders.lease``).

Every Lease call runs on one worker thread of its own, with its own connection pool: a
renewal never queues behind the reconcilers' calls. The holder renews from a thread of its
own too, so a busy or wedged event loop cannot hold a renewal past its deadline; when the
deadline passes it calls ``lost`` (the operator exits at once), whatever the loop is doing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from troupe_operator.builders import lease as rules
from troupe_operator.builders.lease import ElectionTimings, LeaseRecord, ObservedLease

MIN_REQUEST_SECONDS = 0.2
"""A request always gets some time (the client reads a timeout of 0 as none at all)."""
logger = logging.getLogger(__name__)


def preload_api_classes() -> None:
    """Import the API classes the reconcilers use: the kubernetes client imports each on
    first use, which takes seconds, so a standby does it while it waits, not on takeover."""
    for name in ("CoreV1Api", "AppsV1Api", "CustomObjectsApi"):
        getattr(client, name)


class LeaseConflict(Exception):
    """Someone else wrote the Lease since it was read (or created it first)."""


class LeaseUnavailable(Exception):
    """The API server could not be asked, or refused for another reason."""


class Lock(Protocol):
    """The Lease's three calls; ``timeout`` bounds each in seconds."""

    namespace: str
    name: str

    def read(self, timeout: float) -> ObservedLease | None: ...

    def create(self, record: LeaseRecord, timeout: float) -> ObservedLease: ...

    def replace(
        self, record: LeaseRecord, resource_version: str, timeout: float
    ) -> ObservedLease: ...


class LeaseLock:
    """A coordination.k8s.io/v1 Lease: read it, create it, replace it at a resourceVersion."""

    def __init__(self, api_client: client.ApiClient, namespace: str, name: str) -> None:
        self._api: Any = client.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.name = name

    def _call(
        self, method: Callable[..., Any], *args: Any, timeout: float, missing_ok: bool = False
    ) -> ObservedLease | None:
        try:
            response = method(
                *args,
                _preload_content=False,
                _request_timeout=max(timeout, MIN_REQUEST_SECONDS),
            )
        except ApiException as error:
            if error.status == 404 and missing_ok:
                return None
            if error.status == 409:
                raise LeaseConflict(error.reason) from error
            raise LeaseUnavailable(f"{error.status} {error.reason}") from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise LeaseUnavailable(str(error)) from error
        return rules.read_lease(json.loads(response.data))

    def _written(self, method: Callable[..., Any], *args: Any, timeout: float) -> ObservedLease:
        written = self._call(method, *args, timeout=timeout)
        assert written is not None, "a write answers with the object"
        return written

    def read(self, timeout: float) -> ObservedLease | None:
        return self._call(
            self._api.read_namespaced_lease,
            self.name,
            self.namespace,
            timeout=timeout,
            missing_ok=True,
        )

    def create(self, record: LeaseRecord, timeout: float) -> ObservedLease:
        body = rules.lease_manifest(self.namespace, self.name, record)
        return self._written(
            self._api.create_namespaced_lease, self.namespace, body, timeout=timeout
        )

    def replace(self, record: LeaseRecord, resource_version: str, timeout: float) -> ObservedLease:
        body = rules.lease_manifest(self.namespace, self.name, record, resource_version)
        return self._written(
            self._api.replace_namespaced_lease, self.name, self.namespace, body, timeout=timeout
        )


class Attempt(enum.Enum):
    """How one try to acquire or renew ended."""

    HELD = "held"
    """This replica holds the Lease now."""
    TAKEN = "taken"
    """Another replica holds it, and it has not expired."""
    FAILED = "failed"
    """The API server could not be asked, or another write won the race: try again."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


class LeaderElector:
    """One replica's side of the election: ``acquire``, then ``start_holding``, ``release``."""

    def __init__(
        self,
        lock: Lock,
        identity: str,
        timings: ElectionTimings,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.lock = lock
        self.identity = identity
        self.timings = timings
        self._monotonic = monotonic
        self._wall = wall
        self._observation: rules.Observation | None = None
        self._closing = False
        self._renewed_at: float | None = None
        self._stop_holding = threading.Event()
        self._holder: threading.Thread | None = None
        self.last_contact: float | None = None
        """When (monotonic) the API server last answered: readiness of a standby."""
        # One worker: attempts never overlap, and a release runs after any attempt in flight.
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lease")

    @property
    def holder(self) -> str | None:
        """The holder as last seen ("" when released), or None before the first read."""
        return None if self._observation is None else self._observation.lease.record.holder

    @property
    def leading(self) -> bool:
        return self._renewed_at is not None

    @property
    def renewed_at(self) -> float | None:
        """When (monotonic) the last successful acquire or renew began; None unless leading."""
        return self._renewed_at

    def in_contact(self) -> bool:
        """Whether the API server answered within a lease duration (else: not ready)."""
        return (
            self.last_contact is not None
            and self._monotonic() - self.last_contact < self.timings.lease_duration
        )

    def try_acquire_or_renew(self, timeout: float) -> Attempt:
        """One read, then one write if the rules allow it; ``timeout`` bounds each call."""
        if self._closing:
            return Attempt.FAILED
        started = self._monotonic()
        try:
            current = self.lock.read(timeout)
            self.last_contact = self._monotonic()
            if current is None:
                written = self.lock.create(
                    rules.claimed(None, self.identity, self.timings.lease_duration, self._wall()),
                    timeout,
                )
            else:
                # Seen when the answer came: a standby's clock starts late, never early.
                seen = self._monotonic()
                self._observation = rules.observe(self._observation, current, seen)
                if not rules.may_acquire(self._observation, self.identity, seen):
                    return Attempt.TAKEN
                record = rules.claimed(
                    current.record, self.identity, self.timings.lease_duration, self._wall()
                )
                written = self.lock.replace(record, current.resource_version, timeout)
        except (LeaseConflict, LeaseUnavailable) as error:
            logger.info("lease %s: %s", self.lock_name, error)
            return Attempt.FAILED
        self.last_contact = self._monotonic()
        self._observation = rules.Observation(written, self.last_contact)
        if self._renewed_at is None:
            logger.info("lease %s acquired by %s", self.lock_name, self.identity)
        # Renewed as of the start of the attempt: a holder's deadline runs early, never late.
        self._renewed_at = started
        return Attempt.HELD

    @property
    def lock_name(self) -> str:
        return f"{self.lock.namespace}/{self.lock.name}"

    async def acquire(self) -> None:
        """Try every retry period until this replica holds the Lease (cancel to give up)."""
        loop = asyncio.get_running_loop()
        timeout = self.timings.retry_period
        while True:
            attempt = await loop.run_in_executor(self._worker, self.try_acquire_or_renew, timeout)
            if attempt is Attempt.HELD:
                return
            await asyncio.sleep(self.timings.retry_period)

    def _bounded_attempt(self, remaining: float) -> Attempt:
        future = self._worker.submit(self.try_acquire_or_renew, remaining)
        try:
            return future.result(timeout=remaining)
        except concurrent.futures.TimeoutError:
            return Attempt.FAILED

    def hold(self, lost: Callable[[str], None]) -> None:
        """Renew every retry period; call ``lost`` (which must stop every write) once another
        replica holds the Lease or the renew deadline passed without a renewal."""
        assert self._renewed_at is not None, "acquire the Lease first"
        retry, deadline_seconds = self.timings.retry_period, self.timings.renew_deadline
        while not self._stop_holding.wait(retry):
            renewed_at = self._renewed_at
            while True:
                now = self._monotonic()
                if rules.renew_overdue(renewed_at, self.timings, now):
                    lost(f"could not renew the lease {self.lock_name} for {deadline_seconds}s")
                    return
                attempt = self._bounded_attempt(renewed_at + deadline_seconds - now)
                if attempt is Attempt.HELD:
                    break
                if attempt is Attempt.TAKEN:
                    lost(f"the lease {self.lock_name} is held by {self.holder} now")
                    return
                pause = min(retry, max(renewed_at + deadline_seconds - self._monotonic(), 0.0))
                if self._stop_holding.wait(pause):
                    return

    def start_holding(self, lost: Callable[[str], None]) -> None:
        """Renew from a thread of its own until ``release``."""
        self._holder = threading.Thread(
            target=self.hold, args=(lost,), name="lease-renewer", daemon=True
        )
        self._holder.start()

    def release(self) -> bool:
        """Stop renewing and clear the holder, so a standby takes over on its next try.

        Returns whether the Lease was released; one held by another replica, or an API
        server that does not answer, is left alone (it then expires by itself).
        """
        self._closing = True
        self._stop_holding.set()
        if self._holder is not None:
            self._holder.join(self.timings.renew_deadline)
        future = self._worker.submit(self._release)
        try:
            return future.result(timeout=self.timings.renew_deadline)
        except concurrent.futures.TimeoutError:
            return False
        finally:
            self._worker.shutdown(wait=False)

    def _release(self) -> bool:
        if self._renewed_at is None:
            return False
        timeout = self.timings.retry_period
        try:
            current = self.lock.read(timeout)
            if current is None or current.record.holder != self.identity:
                return False
            self.lock.replace(
                rules.released(current.record, self._wall()), current.resource_version, timeout
            )
        except (LeaseConflict, LeaseUnavailable) as error:
            logger.warning("lease %s not released (%s): it will expire", self.lock_name, error)
            return False
        self._renewed_at = None
        logger.info("lease %s released by %s", self.lock_name, self.identity)
        return True
