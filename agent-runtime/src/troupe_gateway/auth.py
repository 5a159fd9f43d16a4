"""Who is calling, and may they: bearer tokens checked by TokenReview, per-namespace API
keys from Secrets, then a SubjectAccessReview on the virtual verb ``invoke``.

Kubernetes decides both questions, so a cluster's own RBAC says who may call which Agent
(bind the chart's ``troupe-invoker`` ClusterRole). The gateway only caches answers, briefly
and in bounded memory, keyed by digests: a revoked binding or a deleted key Secret stops
working within the cache's TTL. ``parse_credentials`` is pure, so hostile headers are
property-tested apart from any I/O.

API-key rules (docs/gateway.md, "Auth"): a Secret in the call's namespace labelled
``troupe.dev/api-key: "true"`` holds the key in its data key ``key`` (surrounding whitespace
dropped: a file's trailing newline could never be sent in a header) and names a
ServiceAccount of that namespace in the annotation ``troupe.dev/service-account``; the key
acts as that ServiceAccount (groups ``system:serviceaccounts`` and
``system:serviceaccounts:<ns>``). A Secret without the annotation, with an invalid account
name, or with a key of fewer than 16 or more than 1024 bytes or outside printable ASCII is
ignored (logged once). A key found in Secrets naming different accounts is refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

from troupe_gateway.kube import (
    Extra,
    Kube,
    KubeUnavailable,
    Review,
    is_dns_label,
    is_dns_subdomain,
)
from troupe_runtime.contract.gateway import INVOKE_VERB

log = logging.getLogger(__name__)

Resource = Literal["agents", "workflows", "triggers"]

API_GROUP = "troupe.dev"
API_KEY_LABEL = "troupe.dev/api-key"
API_KEY_SELECTOR = f"{API_KEY_LABEL}=true"
API_KEY_DATA_KEY = "key"
SERVICE_ACCOUNT_ANNOTATION = "troupe.dev/service-account"
MIN_API_KEY_BYTES = 16
MAX_API_KEY_BYTES = 1024
# A ServiceAccount JWT is about 1 KiB; OIDC tokens with many groups a few KiB.
MAX_TOKEN_BYTES = 8192
TOKEN_TTL_SECONDS = 30.0
KEYS_TTL_SECONDS = 10.0
ACCESS_TTL_SECONDS = 10.0
WWW_AUTHENTICATE = 'Bearer realm="troupe-gateway"'

# RFC 6750's b64token, after the scheme (matched case-insensitively, RFC 9110).
_BEARER = re.compile(r"(?i:bearer) +([A-Za-z0-9\-._~+/]+=*)", re.ASCII)
_API_KEY = re.compile(r"[\x21-\x7e]+", re.ASCII)


@dataclass(frozen=True)
class Caller:
    user: str
    """A Kubernetes user name (``system:serviceaccount:<ns>:<sa>`` for tokens and API keys)."""
    groups: tuple[str, ...] = ()
    via: Literal["token", "api-key", "anonymous"] = "token"
    uid: str = ""
    extra: Extra = ()
    """The TokenReview's ``user.extra``, handed on to the SubjectAccessReview."""


class Refused(Exception):
    """401 (no or bad credentials), 403 (RBAC says no) or 503 (the API server could not
    answer), with a reason safe to show and the headers to answer with."""

    def __init__(self, status: Literal[401, 403, 503], reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    @property
    def headers(self) -> dict[str, str]:
        if self.status == 401:
            return {"WWW-Authenticate": WWW_AUTHENTICATE}
        if self.status == 503:
            return {"Retry-After": "1"}
        return {}


class AuthUnavailable(Refused):
    """503: the API server could not answer, which is no judgement of the caller's
    credentials (retry). A ``Refused`` still, so a front end that maps ``status`` answers
    it right; one that must tell it apart catches this first."""

    def __init__(self, reason: str) -> None:
        super().__init__(503, reason)


class Authorizer(Protocol):
    async def authenticate(self, headers: Mapping[str, str], namespace: str) -> Caller:
        """Raises ``Refused(401)`` (or 503)."""
        ...

    async def authorize(
        self, caller: Caller, namespace: str, resource: Resource, name: str
    ) -> None:
        """Raises ``Refused(403)`` unless RBAC lets ``caller`` ``invoke`` it (or 503)."""
        ...


@dataclass(frozen=True)
class BearerToken:
    token: str


@dataclass(frozen=True)
class ApiKey:
    key: str


Credential = BearerToken | ApiKey


def _values(headers: Mapping[str, str], name: str) -> list[str]:
    """Every value of a header, whatever its case: a Starlette ``Headers`` lists repeated
    headers in ``items()``, a plain dict may hold two spellings."""
    return [value for key, value in headers.items() if key.lower() == name]


def parse_credentials(headers: Mapping[str, str]) -> Credential:
    """The one credential a request carries; ``Refused(401)`` for none, two, or one that is
    malformed. Reasons never quote the header's value."""
    authorization = _values(headers, "authorization")
    api_key = _values(headers, "x-api-key")
    if not authorization and not api_key:
        raise Refused(401, "no credentials: send Authorization: Bearer <token> or X-API-Key")
    if len(authorization) + len(api_key) > 1:
        raise Refused(401, "more than one credential: send one Authorization or X-API-Key")
    if authorization:
        value = authorization[0].strip(" \t")
        if len(value) > MAX_TOKEN_BYTES + 16 or not value.isascii():
            raise Refused(401, "malformed Authorization header")
        match = _BEARER.fullmatch(value)
        if match is None:
            raise Refused(401, "malformed Authorization header: expected Bearer <token>")
        return BearerToken(match.group(1))
    value = api_key[0].strip(" \t")
    if not value.isascii() or _API_KEY.fullmatch(value) is None:
        raise Refused(401, "malformed X-API-Key header")
    if not MIN_API_KEY_BYTES <= len(value) <= MAX_API_KEY_BYTES:
        raise Refused(401, f"an API key has {MIN_API_KEY_BYTES} to {MAX_API_KEY_BYTES} characters")
    return ApiKey(value)


def jwt_seconds_left(token: str, now: float) -> float | None:
    """Seconds until the token's ``exp`` claim, when it is a JWT with one: the cache keeps a
    token no longer than it is valid. Unverified: it can only shorten a cache entry."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return None
    expiry = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(expiry, bool) or not isinstance(expiry, int | float):
        return None
    left = float(expiry) - now
    return left if left == left else None  # NaN: no claim worth using


@dataclass(frozen=True)
class KeyEntry:
    """An API key as the gateway keeps it: its digest, never the key."""

    digest: bytes
    service_account: str
    secret: str


def key_entries(
    secrets: list[tuple[str, dict[str, str], dict[str, bytes]]],
) -> tuple[list[KeyEntry], list[tuple[str, str]]]:
    """The usable keys of a namespace's labelled Secrets, and ``(secret, why)`` for each
    ignored one (the module docstring's rules)."""
    entries: list[KeyEntry] = []
    ignored: list[tuple[str, str]] = []
    for name, notes, data in secrets:
        account = notes.get(SERVICE_ACCOUNT_ANNOTATION, "")
        raw = data.get(API_KEY_DATA_KEY)
        key = raw.strip(b" \t\r\n") if raw is not None else b""
        if not account:
            ignored.append((name, f"no {SERVICE_ACCOUNT_ANNOTATION} annotation"))
        elif not is_dns_subdomain(account):
            ignored.append((name, f"{SERVICE_ACCOUNT_ANNOTATION} is not a valid name"))
        elif raw is None:
            ignored.append((name, f"no data key {API_KEY_DATA_KEY!r}"))
        elif not MIN_API_KEY_BYTES <= len(key) <= MAX_API_KEY_BYTES:
            ignored.append(
                (name, f"the key is not {MIN_API_KEY_BYTES} to {MAX_API_KEY_BYTES} bytes")
            )
        elif _API_KEY.fullmatch(key.decode("latin-1")) is None:
            ignored.append((name, "the key is not printable ASCII"))
        else:
            entries.append(KeyEntry(hashlib.sha256(key).digest(), account, name))
    return entries, ignored


K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """Answers kept ``ttl`` seconds, the least recently used dropped past ``size``; one load
    per key at a time (concurrent misses share it, and a caller that goes away does not
    cancel it for the others). A load that raises is not kept."""

    def __init__(self, ttl: float, size: int, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._size = size
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._loading: dict[K, asyncio.Task[tuple[V, float]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def _put(self, key: K, value: V, ttl: float) -> None:
        if ttl <= 0:
            return
        self._entries[key] = (self._clock() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    async def get(self, key: K, load: Callable[[], Awaitable[tuple[V, float]]]) -> V:
        """The kept value, else ``load()``'s, which also says how long to keep it."""
        kept = self._entries.get(key)
        if kept is not None:
            if kept[0] > self._clock():
                self._entries.move_to_end(key)
                return kept[1]
            del self._entries[key]
        task = self._loading.get(key)
        if task is None:

            async def run() -> tuple[V, float]:
                return await load()

            task = asyncio.ensure_future(run())
            self._loading[key] = task

            def settle(done: asyncio.Task[tuple[V, float]]) -> None:
                self._loading.pop(key, None)
                if not done.cancelled() and done.exception() is None:
                    value, ttl = done.result()
                    self._put(key, value, ttl)

            task.add_done_callback(settle)
        value, _ = await asyncio.shield(task)
        return value


def _unavailable(error: KubeUnavailable) -> AuthUnavailable:
    log.warning("the Kubernetes API server did not answer: %s", error)
    return AuthUnavailable("the Kubernetes API server did not answer; try again")


class KubernetesAuthorizer:
    """The ``Authorizer`` the gateway runs: Kubernetes authenticates and authorizes."""

    def __init__(
        self,
        kube: Kube,
        *,
        audiences: tuple[str, ...] = (),
        token_ttl: float = TOKEN_TTL_SECONDS,
        keys_ttl: float = KEYS_TTL_SECONDS,
        access_ttl: float = ACCESS_TTL_SECONDS,
        size: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kube = kube
        self._audiences = audiences
        self._token_ttl = token_ttl
        self._keys_ttl = keys_ttl
        self._access_ttl = access_ttl
        self._tokens: TtlCache[bytes, Review] = TtlCache(token_ttl, size, clock)
        self._keys: TtlCache[str, list[KeyEntry]] = TtlCache(keys_ttl, size // 4 or 1, clock)
        self._access: TtlCache[tuple[object, ...], Review] = TtlCache(access_ttl, size * 4, clock)
        self._warned: OrderedDict[tuple[str, str, str], None] = OrderedDict()

    async def authenticate(self, headers: Mapping[str, str], namespace: str) -> Caller:
        credential = parse_credentials(headers)
        if isinstance(credential, BearerToken):
            return await self._token_caller(credential.token)
        return await self._key_caller(credential.key, namespace)

    async def _token_caller(self, token: str) -> Caller:
        digest = hashlib.sha256(token.encode()).digest()

        async def review() -> tuple[Review, float]:
            answer = await self._kube.token_review(token, self._audiences)
            left = jwt_seconds_left(token, time.time()) if answer.ok else None
            return answer, self._token_ttl if left is None else min(self._token_ttl, left)

        try:
            answer = await self._tokens.get(digest, review)
        except KubeUnavailable as error:
            raise _unavailable(error) from None
        if not answer.ok:
            log.info("bearer token sha256:%s refused: %s", digest.hex()[:12], answer.reason)
            raise Refused(401, "the bearer token is not valid for this cluster")
        return Caller(answer.user, answer.groups, "token", answer.uid, answer.extra)

    async def _key_entries(self, namespace: str) -> list[KeyEntry]:
        async def listing() -> tuple[list[KeyEntry], float]:
            entries, ignored = key_entries(await self._kube.secrets(namespace, API_KEY_SELECTOR))
            for secret, why in ignored:
                self._warn_once(namespace, secret, why)
            return entries, self._keys_ttl

        try:
            return await self._keys.get(namespace, listing)
        except KubeUnavailable as error:
            raise _unavailable(error) from None

    def _warn_once(self, namespace: str, secret: str, why: str) -> None:
        said = (namespace, secret, why)
        if said in self._warned:
            return
        self._warned[said] = None
        while len(self._warned) > 1024:
            self._warned.popitem(last=False)
        log.warning("API-key Secret %s/%s is ignored: %s", namespace, secret, why)

    async def _key_caller(self, key: str, namespace: str) -> Caller:
        refused = Refused(401, f"the API key is not valid in namespace {namespace!r}")
        if not is_dns_label(namespace):
            raise Refused(401, "the API key is not valid in that namespace")
        presented = hashlib.sha256(key.encode()).digest()
        accounts: set[str] = set()
        secrets: list[str] = []
        # Every entry is compared, in constant time each: the time taken says nothing of
        # which key came close.
        for entry in await self._key_entries(namespace):
            if hmac.compare_digest(entry.digest, presented):
                accounts.add(entry.service_account)
                secrets.append(entry.secret)
        if len(accounts) != 1:
            if accounts:
                log.warning(
                    "an API key of %s is in Secrets naming different accounts (%s): refused",
                    namespace,
                    ", ".join(sorted(secrets)),
                )
            raise refused
        account = accounts.pop()
        return Caller(
            f"system:serviceaccount:{namespace}:{account}",
            ("system:serviceaccounts", f"system:serviceaccounts:{namespace}"),
            "api-key",
        )

    async def authorize(
        self, caller: Caller, namespace: str, resource: Resource, name: str
    ) -> None:
        if not is_dns_label(namespace) or not is_dns_subdomain(name):
            # Nothing by that name can exist; and no hostile path fills the cache.
            raise Refused(403, f"{caller.user} may not {INVOKE_VERB} that: not a valid name")
        key = (caller.user, caller.groups, caller.uid, caller.extra, namespace, resource, name)

        async def review() -> tuple[Review, float]:
            answer = await self._kube.access_review(
                caller.user,
                caller.groups,
                namespace=namespace,
                verb=INVOKE_VERB,
                group=API_GROUP,
                resource=resource,
                name=name,
                uid=caller.uid,
                extra=caller.extra,
            )
            return answer, self._access_ttl

        try:
            answer = await self._access.get(key, review)
        except KubeUnavailable as error:
            raise _unavailable(error) from None
        if not answer.ok:
            said = f": {answer.reason}" if answer.reason else ""
            raise Refused(
                403,
                f"{caller.user} may not {INVOKE_VERB} {resource} {name!r} "
                f"in namespace {namespace!r}{said}",
            )
