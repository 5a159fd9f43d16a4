"""Remote A2A agents as tools, through the official ``a2a-sdk`` client.

One tool per remote agent, named by ``spec.llm.tools.a2a[].name``, not one per skill: A2A
sends a message to an agent, never to a skill (a skill is a description on the card), so
tools per skill would be several names for the same request, and the model would believe
it chose something it cannot. The skills (those the ``skills`` filter keeps) go into the
tool's description instead.

The parameters are Troupe's own (``PARAMETERS``): a message text and optional structured
data, sent as a text part and a data part of one blocking ``SendMessage``; the answer is the
final task's artifacts (or the agent's message), rendered to text and capped. A task that
fails, is rejected or cancelled, or asks for input or auth is an error result naming its
state and the agent's words; so are an unreachable agent, an HTTP or JSON-RPC error and a
timeout. Nothing here raises to the loop for a remote's fault.

The card is read once per process (on start, and again on a call while it could not be
read, or after a transport error) with the SDK's ``A2ACardResolver``, and is untrusted:
its name, description and skills are stripped of control and bidirectional characters and
bounded before they reach the model; a card or an answer larger than ``MAX_RESPONSE_BYTES``
is refused while it is read. The tool's name never comes from the card.

A bearer token (``auth``) comes from an environment variable the operator fills from a
Secret. It is sent only to the card's origin: with a token, the card's interfaces on
another origin are ignored (a card could otherwise send the token anywhere), and redirects
are never followed. Whatever the remote says is scrubbed of the token before the model, the
journal or a log sees it (a hostile agent may echo it back).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
from a2a.client import A2ACardResolver, Client, ClientConfig, ClientFactory
from a2a.client.errors import A2AClientError, A2AClientTimeoutError
from a2a.helpers.proto_helpers import get_data_parts
from a2a.types import a2a_pb2 as pb
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH, TransportProtocol
from a2a.utils.errors import A2AError

from troupe_runtime.agent.llm.tools.base import (
    MAX_DESCRIPTION_CHARS,
    MAX_RESULT_BYTES,
    Parameters,
    as_text,
    capped,
    error_result,
    parameters,
    shortened,
    unique,
)
from troupe_runtime.agent.llm.types import ToolCall, ToolResult, ToolSpec
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.llm import ResolvedTool
from troupe_runtime.contract.llm_policy import A2aAgent

logger = logging.getLogger(__name__)

MAX_TEXT_CHARS = 100_000
"""The message text the model may send in one call."""
MAX_RESPONSE_BYTES = 8 * MAX_RESULT_BYTES
"""A card or an answer larger than this is refused while it is read: the answer is cut to
``MAX_RESULT_BYTES`` anyway, and a hostile remote must not fill the pod's memory."""
CARD_SECONDS = 5.0
"""Reading the card on start; on a call, the call's own timeout bounds it."""
MAX_SKILLS = 16
"""Skills described to the model; the rest are counted."""
MAX_NAME_CHARS = 100
MAX_CARD_DESCRIPTION_CHARS = 1000
MAX_SKILL_CHARS = 300
POLL_FIRST = 0.2
POLL_MOST = 2.0
BINDINGS: list[str] = [TransportProtocol.JSONRPC, TransportProtocol.HTTP_JSON]
"""What the client speaks, in the server's order of preference (gRPC is not installed)."""
REDACTED = "[redacted]"

PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "text": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_TEXT_CHARS,
            "description": "The message to the agent, in plain words.",
        },
        "data": {
            "type": "object",
            "description": "Optional structured data sent with the message.",
        },
    },
    "required": ["text"],
    "additionalProperties": False,
}

_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff"
    "\ufff9-\ufffb\U000e0000-\U000e007f]"
)
"""Control, format and bidirectional characters: nothing a description needs, and what
hides text from a person reading the prompt."""
_SPACE = re.compile(r"\s+")

TERMINAL_FAILURES = {
    pb.TaskState.TASK_STATE_FAILED: "failed",
    pb.TaskState.TASK_STATE_REJECTED: "was rejected",
    pb.TaskState.TASK_STATE_CANCELED: "was cancelled",
}
INTERRUPTED = {
    pb.TaskState.TASK_STATE_INPUT_REQUIRED: "input",
    pb.TaskState.TASK_STATE_AUTH_REQUIRED: "authentication",
}
RUNNING = {pb.TaskState.TASK_STATE_SUBMITTED, pb.TaskState.TASK_STATE_WORKING}


def clean(text: str, limit: int) -> str:
    """Untrusted text for the model: unsafe characters gone, whitespace collapsed, bounded
    (only the first ``4 * limit`` characters are looked at: a huge field costs nothing)."""
    kept = _SPACE.sub(" ", _UNSAFE.sub(" ", text[: 4 * limit])).strip()
    return kept if len(kept) <= limit else f"{kept[:limit]}... ({len(text)} characters)"


def card_description(policy: A2aAgent, card: pb.AgentCard | None) -> str:
    """What the model reads about the agent: the policy's words, else the card's (cleaned,
    bounded; the skills the filter keeps), else a default naming the tool."""
    if policy.description:
        return shortened(policy.description, MAX_DESCRIPTION_CHARS)
    lines = [f"Send a message to the remote A2A agent {policy.name} and read its answer."]
    if card is not None:
        name = clean(card.name, MAX_NAME_CHARS)
        about = clean(card.description, MAX_CARD_DESCRIPTION_CHARS)
        if name or about:
            lines.append(f"Its card: {name}{': ' if name and about else ''}{about}")
        skills = kept_skills(policy, card)
        for skill in skills[:MAX_SKILLS]:
            title = clean(skill.name or skill.id, MAX_NAME_CHARS)
            said = clean(skill.description, MAX_SKILL_CHARS)
            lines.append(f"- {title}{': ' if said else ''}{said}")
        if len(skills) > MAX_SKILLS:
            lines.append(f"(and {len(skills) - MAX_SKILLS} more skills)")
    return shortened("\n".join(lines), MAX_DESCRIPTION_CHARS)


def kept_skills(policy: A2aAgent, card: pb.AgentCard) -> list[pb.AgentSkill]:
    """The card's skills the policy lets the model know of (all, without a filter)."""
    if policy.skills is None:
        return list(card.skills)
    allowed = set(policy.skills)
    return [skill for skill in card.skills if skill.id in allowed]


def card_spec(policy: A2aAgent, card: pb.AgentCard | None) -> ToolSpec:
    """The tool the model sees for ``policy``: its name is the policy's, never the card's."""
    return ToolSpec(
        name=policy.name,
        description=card_description(policy, card),
        parameters=PARAMETERS,
        idempotent=policy.idempotent,
    )


def card_location(url: str) -> tuple[str, str]:
    """(base URL, card path) for the resolver: a URL whose path ends in .json is the card's
    own; any other is the agent's base, with the card at the well-known path."""
    parts = urlsplit(url)
    if parts.path.endswith(".json"):
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        return f"{parts.scheme}://{parts.netloc}", path
    return url.rstrip("/"), AGENT_CARD_WELL_KNOWN_PATH


def origin(url: str) -> tuple[str, str, int | None]:
    parsed = httpx.URL(url)
    default = {"http": 80, "https": 443}.get(parsed.scheme)
    return parsed.scheme, parsed.host.lower(), parsed.port or default


def same_origin_only(card: pb.AgentCard, url: str) -> str | None:
    """Drop the card's interfaces on another origin than ``url``'s (the token goes to that
    origin only); why none is left, or None."""
    home = origin(url)
    kept = []
    for interface in card.supported_interfaces:
        try:
            if origin(interface.url) == home:
                kept.append(interface)
        except httpx.InvalidURL:
            continue
    others = len(card.supported_interfaces) - len(kept)
    del card.supported_interfaces[:]
    card.supported_interfaces.extend(kept)
    if not kept:
        return (
            f"none of the card's interfaces is on the card's origin ({others} elsewhere); "
            "the bearer token is sent to the card's origin only"
        )
    return None


def parts_text(parts: Sequence[pb.Part]) -> list[str]:
    """Each part for the model: text as it is, data as JSON, files as placeholders."""
    texts = []
    size = 0
    for part in parts:
        if part.HasField("text"):
            text = part.text
        elif part.HasField("data"):
            [data] = get_data_parts([part])
            text = as_text(data)
        elif part.HasField("raw"):
            text = f"[file {clean(part.filename, 200)!r}: {clean(part.media_type, 100)}, "
            text += f"{len(part.raw)} bytes]"
        elif part.HasField("url"):
            text = f"[file at {clean(part.url, 500)}]"
        else:
            continue
        texts.append(text)
        size += len(text)
        if size > MAX_RESULT_BYTES:
            break
    return texts


def task_result(agent: str, task: pb.Task) -> ToolResult:
    """The final task for the model: its artifacts (or status message) when it completed,
    else an error naming its state and what the agent said."""
    state = task.status.state
    status = task.status
    said = " ".join(parts_text(status.message.parts)) if status.HasField("message") else ""
    if state == pb.TaskState.TASK_STATE_COMPLETED:
        texts = [text for artifact in task.artifacts for text in parts_text(artifact.parts)]
        if not texts and said:
            texts = [said]
        return ToolResult(content=capped("\n".join(texts) or "(the agent answered nothing)"))
    reason = f": {shortened(said)}" if said else " (it gave no reason)"
    if state in TERMINAL_FAILURES:
        return error_result(f"remote agent {agent}: the task {TERMINAL_FAILURES[state]}{reason}")
    if state in INTERRUPTED:
        return error_result(
            f"remote agent {agent} asks for {INTERRUPTED[state]}{reason}; this tool sends one "
            "message per call and continues no task: put everything it needs in the text"
        )
    name = pb.TaskState.Name(state) if state in pb.TaskState.values() else str(state)
    return error_result(f"remote agent {agent}: the task ended in state {name}{reason}")


def message_result(message: pb.Message) -> ToolResult:
    return ToolResult(content=capped("\n".join(parts_text(message.parts)) or "(no content)"))


def describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return shortened(f"{type(error).__name__}: {text}" if str(error) else text)


class _TooLarge(httpx.ReadError):
    pass


class _BoundedStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, request: httpx.Request, limit: int):
        self._inner = inner
        self._request = request
        self._limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = 0
        async for chunk in self._inner:
            read += len(chunk)
            if read > self._limit:
                raise _TooLarge(f"the answer exceeds {self._limit} bytes", request=self._request)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class BoundedTransport(httpx.AsyncBaseTransport):
    """An HTTP transport refusing any response body larger than ``limit`` while it is read."""

    def __init__(self, limit: int = MAX_RESPONSE_BYTES) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._limit = limit

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_BoundedStream(stream, request, self._limit),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


class Unavailable(Exception):
    """The agent cannot be called now; the message says why."""


class A2aConnection:
    """One remote agent: its card (once read), an SDK client over one HTTP client."""

    def __init__(self, policy: A2aAgent, url: str, token: str | None) -> None:
        self.policy = policy
        self.name = policy.name
        self.url = url
        self.timeout = policy.timeout.total_seconds()
        self._token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.timeout),
            follow_redirects=False,
            transport=BoundedTransport(),
        )
        self.card: pb.AgentCard | None = None
        self.spec = card_spec(policy, None)
        self.parameters = _parameters()
        self._client: Client | None = None
        self._lock = asyncio.Lock()
        self._warned = False

    def scrub(self, text: str) -> str:
        return text.replace(self._token, REDACTED) if self._token else text

    async def start(self) -> None:
        """Read the card once, waiting at most ``CARD_SECONDS``; a failure is a warning."""
        try:
            async with asyncio.timeout(min(CARD_SECONDS, self.timeout)):
                await self.client()
        except TimeoutError:
            self._warn(f"no card within {min(CARD_SECONDS, self.timeout):g}s")
        except Unavailable:
            pass  # warned

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "A2A agent %s (%s): %s; calls try again", self.name, self.url, self.scrub(why)
            )

    async def client(self) -> Client:
        """The SDK client, reading the card first if it is not read yet."""
        if (ready := self._client) is not None:
            return ready
        async with self._lock:
            if (ready := self._client) is not None:  # another call read the card meanwhile
                return ready
            base, path = card_location(self.url)
            try:
                card = await A2ACardResolver(self._http, base, path).get_agent_card()
            except A2AError as error:  # AgentCardResolutionError: HTTP, JSON or structure
                self._warn(f"its card cannot be read: {error}")
                raise Unavailable(f"its card cannot be read: {error}") from error
            if self._token and (problem := same_origin_only(card, self.url)) is not None:
                self._warn(problem)
                raise Unavailable(problem)
            config = ClientConfig(
                streaming=False, httpx_client=self._http, supported_protocol_bindings=BINDINGS
            )
            try:
                client = ClientFactory(config).create(card)
            except ValueError as error:
                why = f"its card offers no interface in JSON-RPC or HTTP+JSON: {error}"
                self._warn(why)
                raise Unavailable(why) from error
            self.card = card
            self.spec = card_spec(self.policy, card)
            if self._warned:
                logger.info("A2A agent %s (%s): its card is read", self.name, self.url)
            self._warned = False
            self._client = client
            return client

    async def call(self, message: pb.Message) -> ToolResult:
        """Send ``message`` and wait for the final task; every failure is an error result,
        scrubbed of the token."""
        result = await self._call(message)
        return ToolResult(content=self.scrub(result.content), is_error=result.is_error)

    async def _call(self, message: pb.Message) -> ToolResult:
        name = self.name
        try:
            async with asyncio.timeout(self.timeout):
                client = await self.client()
                return await self._answer(client, message)
        except TimeoutError:
            return error_result(f"remote agent {name} did not answer within {self.timeout:g}s")
        except Unavailable as error:
            return error_result(f"remote agent {name} cannot be called: {error}")
        except A2AClientTimeoutError:
            return error_result(f"remote agent {name} did not answer within {self.timeout:g}s")
        except A2AClientError as error:  # HTTP status, network, a malformed answer
            self._client = None  # read the card again: the agent may have moved or restarted
            return error_result(f"calling remote agent {name} failed: {describe(error)}")
        except A2AError as error:  # the agent's own JSON-RPC error
            return error_result(f"remote agent {name} refused the message: {describe(error)}")
        except httpx.HTTPError as error:
            self._client = None
            return error_result(f"calling remote agent {name} failed: {describe(error)}")

    async def _answer(self, client: Client, message: pb.Message) -> ToolResult:
        request = pb.SendMessageRequest(message=message)
        last: pb.StreamResponse | None = None
        async for response in client.send_message(request):
            last = response
        if last is None:
            return error_result(f"remote agent {self.name} sent no answer")
        if last.HasField("message"):
            return message_result(last.message)
        if not last.HasField("task"):
            return error_result(f"remote agent {self.name} answered neither a task nor a message")
        task = last.task
        delay = POLL_FIRST
        while task.status.state in RUNNING:  # a blocking send the agent answered early
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MOST)
            task = await client.get_task(pb.GetTaskRequest(id=task.id))
        return task_result(self.name, task)

    async def aclose(self) -> None:
        await self._http.aclose()


def _parameters() -> Parameters:
    checked = parameters(PARAMETERS)
    assert not isinstance(checked, str), checked
    return checked


def build_message(
    call: ToolCall, arguments: Mapping[str, Any], cause: CloudEvent | None
) -> pb.Message:
    """The message of one tool call; its id is the same for the same message and call, so
    an agent that deduplicates by message id sees a redelivered caller's call once."""
    seed = f"{cause.id if cause is not None else uuid.uuid4().hex}/{call.id}"
    parts = [pb.Part(text=arguments["text"])]
    if isinstance(arguments.get("data"), dict):
        data = pb.Part(media_type="application/json")
        data.data.struct_value.update(json.loads(json.dumps(arguments["data"])))
        parts.append(data)
    return pb.Message(
        message_id=str(uuid.uuid5(uuid.NAMESPACE_URL, seed)),
        role=pb.Role.ROLE_USER,
        parts=parts,
    )


class A2aToolBox:
    """The remote A2A agents an agent may call (``spec.llm.tools.a2a``)."""

    def __init__(
        self, connections: Sequence[A2aConnection], cause: CloudEvent | None = None
    ) -> None:
        self._connections = unique(connections, lambda c: c.name, "a2a")
        self._cause = cause

    @classmethod
    def from_policy(
        cls, agents: Sequence[A2aAgent], resolved: Sequence[ResolvedTool], env: Mapping[str, str]
    ) -> A2aToolBox:
        """One connection per agent; ``ValueError`` when a token's variable is unset."""
        found = {tool.name: tool for tool in resolved}
        planned = []
        for agent in agents:
            tool = found.get(agent.name)
            url = tool.url if tool is not None and tool.url else agent.url
            token = None
            if agent.auth is not None:
                variable = tool.token_env if tool is not None else None
                token = env.get(variable) if variable else None
                if not token:
                    raise ValueError(
                        f"spec.llm.tools.a2a {agent.name!r} has auth but its token variable "
                        f"{variable or '(none resolved)'} is unset or empty; the operator "
                        "fills it from the Secret"
                    )
            planned.append((agent, url, token))
        connections = [A2aConnection(agent, url, token) for agent, url, token in planned]
        return cls(connections)

    def bound(self, cause: CloudEvent) -> A2aToolBox:
        return A2aToolBox(list(self._connections.values()), cause)

    async def start(self) -> None:
        await asyncio.gather(*(c.start() for c in self._connections.values()))

    async def specs(self) -> list[ToolSpec]:
        return [connection.spec for connection in self._connections.values()]

    def has(self, name: str) -> bool:
        return name in self._connections

    async def call(self, call: ToolCall, arguments: dict[str, Any]) -> ToolResult:
        connection = self._connections.get(call.name)
        if connection is None:
            return error_result(f"{call.name!r} is not a tool of this agent")
        if (problem := connection.parameters.problem(arguments)) is not None:
            return error_result(f"{call.name}: {problem}")
        return await connection.call(build_message(call, arguments, self._cause))

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self._connections.values()))
