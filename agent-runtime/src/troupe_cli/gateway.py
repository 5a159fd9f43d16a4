"""``troupe call``: one POST to the gateway's plain endpoint, and what its answer means.

``POST {gateway}/v1/namespaces/{ns}/{agents|workflows}/{name}:call?timeout=<s>`` with the
input as the body; ``Idempotency-Key`` is the task id (the same id again is the same task,
so calling again with ``--id`` waits for it again); ``Authorization: Bearer`` or
``X-API-Key``. 200 is a task that ended, 202 one still going. The credentials are sent and
never printed; the answer's text is the gateway's, shown escaped.

Exit codes: 0 completed, 1 failed (or canceled, rejected; the gateway unreachable or
silent), 2 refused (400, 401, 403, 404, 409, 413, 422) or a usage error, 3 still working
when the wait ended (202).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import httpx

from troupe_cli.errors import CliError, Refused
from troupe_runtime.contract import envelope, grammar
from troupe_runtime.contract.run_events import RUN_ID_PATTERN

DEFAULT_GATEWAY_URL: Final = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT: Final = 30.0
MAX_TIMEOUT: Final = 300.0
"""The gateway waits at most this long (``?timeout=``); the CLI never asks for more."""
HTTP_MARGIN_SECONDS: Final = 10.0
"""How much longer than the wait the CLI gives the gateway to answer."""
MAX_REASON: Final = 500
STILL_WORKING_EXIT: Final = 3
TERMINAL: Final = ("completed", "failed", "canceled", "rejected")

Kind = Literal["agent", "workflow"]
_LABEL = re.compile(grammar.DNS_LABEL_PATTERN)


@dataclass(frozen=True)
class CallRequest:
    gateway: str
    namespace: str
    kind: Kind
    name: str
    data: Any
    timeout: float = DEFAULT_TIMEOUT
    token: str | None = None
    api_key: str | None = None
    task_id: str = ""
    """The ``Idempotency-Key``: the caller's, or a new one, so a call cut off can be waited
    for again."""
    session: str | None = None
    """The ``contextId`` (an LLM agent's session) the call belongs to; None: a new one."""

    def __post_init__(self) -> None:
        for what, value in (("namespace", self.namespace), (self.kind, self.name)):
            if len(value) > grammar.DNS_LABEL_MAX or not _LABEL.match(value):
                raise Refused(
                    f"{what} {value!r} is not a Kubernetes name: a DNS label "
                    "(lowercase letters, digits and '-', at most 63)"
                )
        if not self.gateway.startswith(("http://", "https://")):
            raise Refused(
                f"the gateway URL {shown_url(self.gateway)!r} is not http(s); "
                "set --gateway or TROUPE_GATEWAY_URL, e.g. http://127.0.0.1:8080"
            )
        if self.task_id and not RUN_ID_PATTERN.match(self.task_id):
            raise Refused(
                f"task id {self.task_id!r} is not valid: use 1 to 200 letters, digits, "
                "'-', '_' or '='"
            )
        if self.session and not RUN_ID_PATTERN.match(self.session):
            raise Refused(
                f"session {self.session!r} is not valid: use 1 to 200 letters, digits, "
                "'-', '_' or '='"
            )
        if self.token is not None and self.api_key is not None:
            raise Refused("pass a token or an API key, not both")
        for what, secret in (("token", self.token), ("API key", self.api_key)):
            if secret is not None and (not secret or not secret.isprintable()):
                raise Refused(f"the {what} is empty or holds a control character")

    @property
    def target(self) -> str:
        return f"{self.kind} {self.name} in namespace {self.namespace}"

    @property
    def url(self) -> str:
        base = self.gateway.rstrip("/")
        return f"{base}/v1/namespaces/{self.namespace}/{self.kind}s/{self.name}:call"

    @property
    def wait(self) -> float:
        return min(self.timeout, MAX_TIMEOUT)

    def params(self) -> dict[str, str]:
        params = {"timeout": f"{self.wait:g}"}
        if self.session:
            params["contextId"] = self.session
        return params

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": envelope.JSON_CONTENT_TYPE, "Accept": "application/json"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.api_key is not None:
            headers["X-API-Key"] = self.api_key
        if self.task_id:
            headers["Idempotency-Key"] = self.task_id
        return headers


@dataclass(frozen=True)
class CallAnswer:
    """A task as the gateway answered it (200 or 202)."""

    task_id: str
    context_id: str | None
    state: str
    output: Any = None
    error: str | None = None
    reason: str | None = None
    location: str | None = None

    @property
    def exit_code(self) -> int:
        if self.state == "completed":
            return 0
        return 1 if self.state in TERMINAL else STILL_WORKING_EXIT

    def document(self) -> dict[str, Any]:
        return {
            "taskId": self.task_id,
            "contextId": self.context_id,
            "state": self.state,
            "output": self.output,
            "error": self.error,
            "reason": self.reason,
        }


def shown_url(url: str) -> str:
    """Scheme, host and port only: a URL's user info may hold a password."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<an invalid URL>"
    return f"{parts.scheme}://{parts.hostname or ''}{port}"


def _body(content: bytes) -> Any:
    try:
        return json.loads(content, parse_constant=envelope.refuse_json_constant)
    except (ValueError, RecursionError):
        return None


def _short(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_REASON else flat[: MAX_REASON - 1] + "…"


def _reason(body: Any, content: bytes) -> str:
    """What the gateway said went wrong: a JSON body's reason, error or detail, else its text."""
    if isinstance(body, dict):
        for key in ("reason", "error", "detail", "message"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return _short(value)
    text = content.decode("utf-8", "replace")
    return _short(text) or "no reason given"


def _text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    return value if isinstance(value, str) else None


def answer(
    request: CallRequest, status: int, content: bytes, location: str | None = None
) -> CallAnswer:
    """The answer to ``request``, or the ``Refused`` / ``CliError`` its status means."""
    body = _body(content)
    if status in (200, 202):
        task_id = _text(body, "taskId") if isinstance(body, dict) else None
        state = _text(body, "state") if isinstance(body, dict) else None
        if not isinstance(body, dict) or task_id is None or state is None:
            raise CliError(
                f"the gateway answered {status} for {request.target} without a task "
                f"(taskId and state); is {request.gateway} a Troupe gateway?"
            )
        return CallAnswer(
            task_id=task_id,
            context_id=_text(body, "contextId"),
            state=state,
            output=body.get("output"),
            error=_text(body, "error"),
            reason=_text(body, "reason"),
            location=location,
        )
    reason = _reason(body, content)
    if status == 401:
        raise Refused(
            f"the gateway refused the credentials ({reason}): pass --token or --api-key "
            "(or set TROUPE_TOKEN or TROUPE_API_KEY)"
        )
    if status == 403:
        raise Refused(
            f"not allowed to invoke {request.target} ({reason}): RBAC must grant the verb "
            f"invoke on {request.kind}s, e.g. a binding of the ClusterRole troupe-invoker"
        )
    if status == 404:
        raise Refused(f"no {request.target} ({reason}); list them with kubectl get {request.kind}s")
    if status == 409:
        raise Refused(f"task id {request.task_id!r} is another target's task ({reason})")
    if 400 <= status < 500:
        raise Refused(f"{request.target} refused the call ({status}: {reason})")
    raise CliError(f"the gateway failed to call {request.target} ({status}: {reason})")


async def call(request: CallRequest) -> CallAnswer:
    """POST the call and wait up to ``request.wait`` (plus a margin) for the answer."""
    try:
        body = json.dumps(request.data, allow_nan=False).encode()
    except (ValueError, RecursionError) as error:
        raise Refused(f"the input cannot be sent as JSON: {error}") from error
    timeout = httpx.Timeout(request.wait + HTTP_MARGIN_SECONDS, connect=10.0)
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            response = await client.post(
                request.url,
                params=request.params(),
                content=body,
                headers=request.headers(),
            )
    except httpx.TimeoutException:
        raise CliError(
            f"the gateway did not answer the call of {request.target} within "
            f"{request.wait + HTTP_MARGIN_SECONDS:g}s; if it was sent, "
            f"`troupe call {request.kind} {request.name} --id {request.task_id}` waits for it"
        ) from None
    except httpx.HTTPError as error:
        raise CliError(
            f"cannot reach the gateway at {shown_url(request.gateway)} "
            f"({type(error).__name__}); set --gateway or TROUPE_GATEWAY_URL"
        ) from None
    return answer(request, response.status_code, response.content, response.headers.get("location"))
