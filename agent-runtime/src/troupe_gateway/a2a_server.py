"""A2A v1.0 for every Agent and Workflow, through the official ``a2a-sdk``: its JSON-RPC and
HTTP+JSON routes in front of a ``RequestHandler`` on ``Calls``.

**Paths.** Per target, base ``/a2a/{namespace}/agents/{name}`` or ``.../workflows/{name}``:
the card at ``{base}/.well-known/agent-card.json``, JSON-RPC at ``POST {base}``, HTTP+JSON
beneath it (``{base}/message:send``, ``{base}/tasks/{id}``, ...) and again beneath
``{base}/{tenant}`` (where the SDK's REST client puts a tenant). The SDK's own tenant
``Mount`` (``/{tenant}`` at the root) is left out: it would swallow every other path of the
gateway.

**Admission before the SDK.** Every request, the card's included, goes through
``Services.admit`` first (authenticate, RBAC ``invoke`` on the object, then look it up):
no or bad credentials answer 401 with ``WWW-Authenticate: Bearer``, RBAC's no 403, an
unknown target 404, each with the reason, and nothing is published. The body is the
binding's error shape: a JSON-RPC error (code -32600, ``data.status``) on the JSON-RPC
path, a ``google.rpc.Status``-like ``{"error": {code, status, message}}`` elsewhere. The
card is not public: it tells what exists, which only RBAC may. The context builder then
hands the admitted caller and directory entry to the handler.

**Tenant.** A request's ``tenant`` (JSON-RPC params, or the REST path segment), when given,
must be the path's namespace: else 400 (``InvalidParamsError``).

**Tasks.** A new message's id is the task id (a retried SendMessage is the same task); its
context id the task's (else the task id). ``a2a_tasks`` maps messages to inputs and tasks to
A2A. A message naming a task (``taskId``) is refused: a Troupe task is one call. Blocking
SendMessage waits up to ``BLOCKING_WAIT_SECONDS`` and answers the task as it then is;
``returnImmediately`` answers it at once. CancelTask cancels a Workflow's run; an Agent's
message cannot be recalled (``TaskNotCancelableError``), nor a task that has ended.
``a2a_push`` keeps and delivers push-notification configs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Final

import httpx
from a2a.auth.user import User
from a2a.extensions.common import HTTP_EXTENSION_HEADER, get_requested_extensions
from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import Event
from a2a.server.request_handlers.request_handler import RequestHandler
from a2a.server.routes.agent_card_routes import create_agent_card_routes
from a2a.server.routes.common import ServerCallContextBuilder
from a2a.server.routes.jsonrpc_routes import create_jsonrpc_routes
from a2a.server.routes.rest_routes import create_rest_routes
from a2a.server.tasks.base_push_notification_sender import BasePushNotificationSender
from a2a.types.a2a_pb2 import (
    AgentCard,
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTaskPushNotificationConfigsResponse,
    ListTasksRequest,
    ListTasksResponse,
    Message,
    SendMessageConfiguration,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskPushNotificationConfig,
)
from a2a.utils.constants import (
    AGENT_CARD_WELL_KNOWN_PATH,
    DEFAULT_LIST_TASKS_PAGE_SIZE,
    MAX_LIST_TASKS_PAGE_SIZE,
)
from a2a.utils.errors import (
    A2AError,
    ExtendedAgentCardNotConfiguredError,
    InternalError,
    InvalidParamsError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from a2a.utils.push_url_validator import validate_push_notification_url
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from troupe_gateway import a2a_push, a2a_tasks, cards
from troupe_gateway.a2a_push import KvPushConfigStore, UrlValidator
from troupe_gateway.auth import Caller, Refused
from troupe_gateway.calls import CallRefused, Delta, Submitted, TaskView
from troupe_gateway.services import Services
from troupe_runtime.contract import grammar
from troupe_runtime.contract.gateway import DirectoryEntry, TargetKind

log = logging.getLogger(__name__)

BLOCKING_WAIT_SECONDS: Final = 240.0
"""A blocking SendMessage's wait: under the usual 300 s of proxies and SSE read timeouts."""
STREAM_WAIT_SECONDS: Final = 3600.0
"""How long a stream follows a task before it ends with the task as it is."""
LISTED_MAX: Final = 1000
"""How far ListTasks pages (newest first)."""
PUSH_TIMEOUT_SECONDS: Final = 10.0
ADMITTED: Final = "troupe.a2a.admitted"
"""The ASGI scope key where the admitted caller and entry travel to the handler."""
REFUSAL_CODE: Final = -32600
SECRET_HEADERS: Final = frozenset({"authorization", "x-api-key", "cookie"})

_NAMESPACE = re.compile(grammar.DNS_LABEL_PATTERN)
_NAME = re.compile(grammar.DNS_SUBDOMAIN_PATTERN)
_STATUS_NAMES: Final = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    503: "UNAVAILABLE",
}


@dataclass(frozen=True)
class Admitted:
    caller: Caller
    entry: DirectoryEntry


class _CallerUser(User):
    def __init__(self, caller: Caller) -> None:
        self.caller = caller

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def user_name(self) -> str:
        return self.caller.user


class AdmittedContextBuilder(ServerCallContextBuilder):
    """The SDK's context from a request ``admitting`` let in: who calls, which target (the
    path's namespace, kind and name, resolved by ``Services.admit``), and the headers the
    SDK reads (the A2A version and extensions), credentials left out."""

    def build(self, request: Request) -> ServerCallContext:
        admitted = request.scope.get(ADMITTED)
        if not isinstance(admitted, Admitted):
            raise InternalError(message="the request was not admitted")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in SECRET_HEADERS}
        return ServerCallContext(
            user=_CallerUser(admitted.caller),
            state={
                "headers": headers,
                ADMITTED: admitted,
                a2a_push.OWNER_STATE: admitted.caller.user,
            },
            requested_extensions=get_requested_extensions(
                request.headers.getlist(HTTP_EXTENSION_HEADER)
            ),
        )


def _refusal(jsonrpc: bool, status: int, reason: str) -> Response:
    words = {401: "unauthorized", 403: "forbidden", 404: "not found"}.get(status, "refused")
    message = f"{words}: {reason}"
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if jsonrpc:
        error = {"code": REFUSAL_CODE, "message": message, "data": {"status": status}}
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": None, "error": error}
    else:
        name = _STATUS_NAMES.get(status, "FAILED_PRECONDITION")
        body = {"error": {"code": status, "status": name, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


Endpoint = Callable[[Request], Awaitable[Response]]


def admitting(services: Services, kind: TargetKind, endpoint: Endpoint, jsonrpc: bool) -> Endpoint:
    """``endpoint`` behind ``Services.admit``: a refusal answers before the SDK reads a byte."""

    async def admitted(request: Request) -> Response:
        namespace = str(request.path_params.get("namespace", ""))
        name = str(request.path_params.get("name", ""))
        if (
            len(namespace) > grammar.DNS_LABEL_MAX
            or not _NAMESPACE.match(namespace)
            or len(name) > grammar.DNS_SUBDOMAIN_MAX
            or not _NAME.match(name)
        ):
            return _refusal(jsonrpc, 404, "a namespace is a DNS label, a name a DNS subdomain")
        try:
            caller, entry = await services.admit(request.headers, namespace, kind, name)
        except Refused as refusal:
            return _refusal(jsonrpc, refusal.status, refusal.reason)
        except CallRefused as refusal:
            return _refusal(jsonrpc, refusal.status, refusal.reason)
        request.scope[ADMITTED] = Admitted(caller, entry)
        return await endpoint(request)

    return admitted


def a2a_error(refusal: CallRefused) -> A2AError:
    """The SDK's error, hence status, for a refused call."""
    if refusal.status == 404:
        return TaskNotFoundError(message=refusal.reason)
    if 400 <= refusal.status < 500:
        return InvalidParamsError(message=refusal.reason)
    return InternalError(message=refusal.reason)


def _history(config_or_request: Any) -> bool:
    """False when the caller asked for no history (``historyLength`` 0)."""
    try:
        asked = config_or_request.HasField("history_length")
    except ValueError:
        return True
    return not (asked and config_or_request.history_length == 0)


def _page_offset(token: str) -> int:
    if not token:
        return 0
    if not token.isdigit() or len(token) > 6:
        raise InvalidParamsError(message="pageToken is not one this server gave")
    return int(token)


class TroupeRequestHandler(RequestHandler):
    """The A2A methods on Troupe's tasks (see the module's docstring)."""

    def __init__(self, services: Services, push_url_validator: UrlValidator | None) -> None:
        self.services = services
        self.push_url_validator = push_url_validator
        self._http: httpx.AsyncClient | None = None
        self._watching: dict[tuple[str, str, str, str], asyncio.Task[None]] = {}

    # Shared steps.

    @staticmethod
    def _admitted(context: ServerCallContext, tenant: str = "") -> Admitted:
        admitted = context.state.get(ADMITTED)
        if not isinstance(admitted, Admitted):
            raise InternalError(message="the request was not admitted")
        given = tenant or context.tenant
        if given and given != admitted.entry.namespace:
            raise InvalidParamsError(
                message=f"tenant {given[:64]!r} is not this endpoint's namespace "
                f"{admitted.entry.namespace!r}"
            )
        return admitted

    async def _view(self, entry: DirectoryEntry, task_id: str) -> TaskView:
        if not task_id:
            raise InvalidParamsError(message="a task id is required")
        view = await self.services.calls.get(entry, task_id)
        if view is None:
            raise TaskNotFoundError(message=f"no task {task_id[:128]!r} of this {entry.kind}")
        return view

    async def _submit(self, admitted: Admitted, message: Message) -> TaskView:
        record = (await self._send(admitted, message, message.message_id or None)).record
        return TaskView(record=record, state="submitted", updated_at=record.created_at)

    async def _send(self, admitted: Admitted, message: Message, task_id: str | None) -> Submitted:
        entry = admitted.entry
        if message.task_id:
            await self._view(entry, message.task_id)
            raise UnsupportedOperationError(
                message="a Troupe task is one call and takes no further message: send a new "
                "message without taskId (contextId groups calls)"
            )
        data = a2a_tasks.message_input(message, entry.input_schema)
        try:
            return await self.services.calls.send(
                entry,
                data,
                caller=admitted.caller.user,
                task_id=task_id,
                context_id=message.context_id or None,
            )
        except CallRefused as refusal:
            raise a2a_error(refusal) from None

    async def _push_config(
        self,
        admitted: Admitted,
        task_id: str,
        config: TaskPushNotificationConfig,
        context: ServerCallContext,
    ) -> TaskPushNotificationConfig:
        checked = await a2a_push.checked(config, task_id, self.push_url_validator)
        stored = await KvPushConfigStore(self.services.js, admitted.entry).set_info(
            task_id, checked, context
        )
        self._watch(admitted.entry, task_id)
        return stored

    # Push delivery: the replica that took the config watches the task.

    def _watch(self, entry: DirectoryEntry, task_id: str) -> None:
        key = (entry.namespace, entry.kind, entry.name, task_id)
        if key in self._watching:
            return
        watcher = asyncio.create_task(self._deliver_when_done(entry, task_id))
        self._watching[key] = watcher
        watcher.add_done_callback(lambda _: self._watching.pop(key, None))

    async def _deliver_when_done(self, entry: DirectoryEntry, task_id: str) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + self.services.settings.task_ttl_seconds
        try:
            view = await self.services.calls.wait(entry, task_id, BLOCKING_WAIT_SECONDS)
            while not view.terminal and loop.time() < until:
                view = await self.services.calls.wait(entry, task_id, BLOCKING_WAIT_SECONDS)
            if view.terminal:
                await self.deliver(entry, view)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "push notifications of a task of %s %s/%s not sent",
                entry.kind,
                entry.namespace,
                entry.name,
            )

    async def deliver(self, entry: DirectoryEntry, view: TaskView) -> None:
        """Send the task to each of its configs this replica claims."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=PUSH_TIMEOUT_SECONDS, follow_redirects=False)
        sender = BasePushNotificationSender(
            self._http,
            KvPushConfigStore(self.services.js, entry),
            push_url_validator=self.push_url_validator,
        )
        await sender.send_notification(view.record.task_id, a2a_tasks.task(view))

    async def aclose(self) -> None:
        watchers = list(self._watching.values())
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()

    # The A2A methods.

    async def on_message_send(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> Task | Message:
        admitted = self._admitted(context, params.tenant)
        configuration = params.configuration
        if configuration.return_immediately:
            view = await self._submit(admitted, params.message)
            task_id = view.record.task_id
            await self._push_config_asked(admitted, task_id, configuration, context)
            current = await self.services.calls.get(admitted.entry, task_id)
            return a2a_tasks.task(current or view, history=_history(configuration))
        # Blocking: subscribed to the answer before the call is published, so a new task's
        # wait reads nothing back (``Calls.listening``).
        task_id = params.message.message_id or uuid.uuid4().hex
        try:
            async with self.services.calls.listening(admitted.entry, task_id) as listener:
                submitted = await self._send(admitted, params.message, task_id)
                await self._push_config_asked(admitted, task_id, configuration, context)
                done = await listener.wait(BLOCKING_WAIT_SECONDS, submitted)
        except CallRefused as refusal:
            raise a2a_error(refusal) from None
        return a2a_tasks.task(done, history=_history(configuration))

    async def _push_config_asked(
        self,
        admitted: Admitted,
        task_id: str,
        configuration: SendMessageConfiguration,
        context: ServerCallContext,
    ) -> None:
        if configuration.HasField("task_push_notification_config"):
            await self._push_config(
                admitted, task_id, configuration.task_push_notification_config, context
            )

    async def _follow(
        self, entry: DirectoryEntry, view: TaskView, events: AsyncIterator[Delta | TaskView]
    ) -> AsyncGenerator[Event]:
        """The task, then its deltas and state changes, then its end."""
        yield a2a_tasks.task(view)
        appended = False
        sequence = 0
        last = view
        async with asyncio.timeout(STREAM_WAIT_SECONDS):
            async for item in events:
                if isinstance(item, TaskView):
                    last = item
                    if item.terminal:
                        break
                    if item.state != view.state:
                        view = item
                        yield a2a_tasks.status_update(item)
                    continue
                sequence += 1
                for event in a2a_tasks.delta_events(
                    last, item, appended=appended, sequence=sequence
                ):
                    yield event
                appended = appended or bool(item.text)
        if not last.terminal:
            last = await self.services.calls.get(entry, view.record.task_id) or last
        for event in a2a_tasks.final_events(last):
            yield event

    async def on_message_send_stream(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event]:
        admitted = self._admitted(context, params.tenant)
        message = params.message
        task_id = message.message_id
        events = self.services.calls.stream(admitted.entry, task_id)
        try:
            view = await self._submit(admitted, message)
            configuration = params.configuration
            if configuration.HasField("task_push_notification_config"):
                await self._push_config(
                    admitted, task_id, configuration.task_push_notification_config, context
                )
            async for event in self._follow(admitted.entry, view, events):
                yield event
        finally:
            closing = getattr(events, "aclose", None)
            if closing is not None:
                await closing()

    async def on_subscribe_to_task(
        self, params: SubscribeToTaskRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event]:
        admitted = self._admitted(context, params.tenant)
        view = await self._view(admitted.entry, params.id)
        if view.terminal:
            raise UnsupportedOperationError(
                message=f"task {params.id[:128]!r} has ended ({view.state}): read it with GetTask"
            )
        events = self.services.calls.stream(admitted.entry, params.id)
        try:
            async for event in self._follow(admitted.entry, view, events):
                yield event
        finally:
            closing = getattr(events, "aclose", None)
            if closing is not None:
                await closing()

    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext) -> Task | None:
        admitted = self._admitted(context, params.tenant)
        view = await self._view(admitted.entry, params.id)
        return a2a_tasks.task(view, history=_history(params))

    async def on_list_tasks(
        self, params: ListTasksRequest, context: ServerCallContext
    ) -> ListTasksResponse:
        admitted = self._admitted(context, params.tenant)
        size = params.page_size if params.HasField("page_size") else DEFAULT_LIST_TASKS_PAGE_SIZE
        if not 1 <= size <= MAX_LIST_TASKS_PAGE_SIZE:
            raise InvalidParamsError(message=f"pageSize is 1 to {MAX_LIST_TASKS_PAGE_SIZE}")
        offset = _page_offset(params.page_token)
        views = await self.services.calls.list(
            admitted.entry, context_id=params.context_id or None, limit=LISTED_MAX
        )
        if params.status:
            wanted = a2a_tasks.TROUPE_STATES.get(params.status)
            views = [view for view in views if view.state == wanted]
        if params.HasField("status_timestamp_after"):
            after = params.status_timestamp_after.ToDatetime(tzinfo=UTC)
            views = [view for view in views if (view.updated_at or view.record.created_at) > after]
        page = views[offset : offset + size]
        more = offset + size < len(views)
        return ListTasksResponse(
            tasks=[a2a_tasks.task(view, history=_history(params)) for view in page],
            next_page_token=str(offset + size) if more else "",
            page_size=size,
            total_size=len(views),
        )

    async def on_cancel_task(
        self, params: CancelTaskRequest, context: ServerCallContext
    ) -> Task | None:
        admitted = self._admitted(context, params.tenant)
        view = await self._view(admitted.entry, params.id)
        if view.terminal:
            raise TaskNotCancelableError(message=f"task {params.id[:128]!r} is {view.state}")
        try:
            view = await self.services.calls.cancel(admitted.entry, params.id)
        except CallRefused as refusal:
            if refusal.status == 409:
                raise TaskNotCancelableError(message=refusal.reason) from None
            raise a2a_error(refusal) from None
        return a2a_tasks.task(view)

    async def on_create_task_push_notification_config(
        self, params: TaskPushNotificationConfig, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        admitted = self._admitted(context, params.tenant)
        await self._view(admitted.entry, params.task_id)
        return await self._push_config(admitted, params.task_id, params, context)

    async def on_get_task_push_notification_config(
        self, params: GetTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        admitted = self._admitted(context, params.tenant)
        await self._view(admitted.entry, params.task_id)
        store = KvPushConfigStore(self.services.js, admitted.entry)
        for config in await store.get_info(params.task_id, context):
            if config.id == params.id:
                return config
        raise TaskNotFoundError(message=f"no push notification config {params.id[:64]!r}")

    async def on_list_task_push_notification_configs(
        self, params: ListTaskPushNotificationConfigsRequest, context: ServerCallContext
    ) -> ListTaskPushNotificationConfigsResponse:
        admitted = self._admitted(context, params.tenant)
        await self._view(admitted.entry, params.task_id)
        store = KvPushConfigStore(self.services.js, admitted.entry)
        return ListTaskPushNotificationConfigsResponse(
            configs=await store.get_info(params.task_id, context)
        )

    async def on_delete_task_push_notification_config(
        self, params: DeleteTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> None:
        admitted = self._admitted(context, params.tenant)
        await self._view(admitted.entry, params.task_id)
        store = KvPushConfigStore(self.services.js, admitted.entry)
        await store.delete_info(params.task_id, context, params.id or None)

    async def on_get_extended_agent_card(
        self, params: GetExtendedAgentCardRequest, context: ServerCallContext
    ) -> AgentCard:
        raise ExtendedAgentCardNotConfiguredError


class A2aFrontEnd:
    """One handler per gateway process; its routes for both kinds of target."""

    def __init__(self, services: Services, push_url_validator: UrlValidator | None) -> None:
        self.services = services
        self.handler = TroupeRequestHandler(services, push_url_validator)
        self.builder = AdmittedContextBuilder()

    def _public_url(self, request: Request) -> str:
        configured = self.services.settings.public_url
        return configured.rstrip("/") if configured else str(request.base_url).rstrip("/")

    def _card_endpoint(self) -> Endpoint:
        async def card(request: Request) -> Response:
            admitted = request.scope[ADMITTED]
            made = cards.card(admitted.entry, self._public_url(request))
            (route,) = create_agent_card_routes(made, cache_control="no-cache")
            endpoint: Endpoint = route.endpoint
            return await endpoint(request)

        return card

    def routes(self) -> list[BaseRoute]:
        made: list[BaseRoute] = []
        for kind, segment in cards.PATH_KINDS.items():
            base = f"/a2a/{{namespace}}/{segment}/{{name}}"
            sdk: list[BaseRoute] = [
                Route(base + AGENT_CARD_WELL_KNOWN_PATH, self._card_endpoint(), methods=["GET"])
            ]
            sdk += create_jsonrpc_routes(self.handler, base, context_builder=self.builder)
            for prefix in (base, base + "/{tenant}"):
                sdk += [
                    route
                    for route in create_rest_routes(
                        self.handler, context_builder=self.builder, path_prefix=prefix
                    )
                    if isinstance(route, Route)
                ]
            for route in sdk:
                assert isinstance(route, Route)
                jsonrpc = route.path == base
                made.append(
                    Route(
                        route.path,
                        admitting(self.services, kind, route.endpoint, jsonrpc),
                        methods=sorted(route.methods or {"GET"}),
                    )
                )
        return made


_FRONT_ENDS: dict[int, tuple[Services, A2aFrontEnd]] = {}


def front_end(services: Services) -> A2aFrontEnd:
    """The one front end of ``services`` (``routes`` and ``lifespan`` share its handler)."""
    held = _FRONT_ENDS.get(id(services))
    if held is None or held[0] is not services:
        validator = None if _push_private(services) else validate_push_notification_url
        held = (services, A2aFrontEnd(services, validator))
        _FRONT_ENDS[id(services)] = held
    return held[1]


def _push_private(services: Services) -> bool:
    """Whether push URLs may reach private addresses (an in-cluster receiver)."""
    return services.settings.push_private_networks


def routes(services: Services) -> list[BaseRoute]:
    return front_end(services).routes()


@contextlib.asynccontextmanager
async def lifespan(services: Services) -> AsyncIterator[None]:
    """The push watchers and their HTTP client end with the process."""
    held = front_end(services)
    try:
        yield
    finally:
        await held.handler.aclose()
        _FRONT_ENDS.pop(id(services), None)
