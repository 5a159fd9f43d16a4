"""Other Troupe Agents as tools: a call is a request to the callee's inbox, answered by reply.

The request is a CloudEvent caused by the message the loop is answering, with an id derived
from that message's id and the model's tool call id (``CloudEvent.follow_up``), published
with that id as ``Nats-Msg-Id``: a redelivered caller re-publishing the same call is
deduplicated by JetStream. Its ``replyto`` is ``naming.agent_call_reply_subject``, a subject
of the namespace's event log, the one place besides workflow engines a callee replies to
(``outputs.reply_refusal``). The log stores the reply, so a caller that died while waiting
finds it on redelivery instead of asking again; a live caller subscribes (core NATS) before
it publishes and gets the reply as it is stored. The callee's contract input schema is the
tool's parameters, checked here before anything is sent.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import Header, RawStreamMsg
from nats.js.errors import NotFoundError

from troupe_runtime.agent.llm.tools.base import (
    Parameters,
    as_text,
    capped,
    description,
    error_result,
    parameters,
    unique,
)
from troupe_runtime.agent.llm.types import ToolCall, ToolResult, ToolSpec
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.envelope import ERROR_TYPE, CloudEvent, MalformedMessage
from troupe_runtime.contract.llm import ResolvedTool
from troupe_runtime.contract.llm_policy import TOOL_NAME_PATTERN, AgentTool
from troupe_runtime.nats.publish import NoStream, publish_stored
from troupe_runtime.serving import tracing

CALL_TYPE = "troupe.tool.call"
"""The type of a tool call's request; its reply is ``troupe.tool.call.result`` or an error."""
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class Callee:
    """One Agent the model may call, and how long it waits for the answer."""

    agent: str
    inbox_subject: str
    spec: ToolSpec
    parameters: Parameters
    timeout: float

    @classmethod
    def resolve(cls, policy: AgentTool, resolved: ResolvedTool | None) -> Callee:
        name = policy.name or policy.agent
        if resolved is None or resolved.inbox_subject is None:
            raise ValueError(
                f"spec.llm.tools.agents {policy.agent!r} has no resolved inbox subject in the "
                "runtime config; the operator resolves one for each Agent it finds"
            )
        if not re.fullmatch(TOOL_NAME_PATTERN, name):
            raise ValueError(
                f"spec.llm.tools.agents {policy.agent!r}: tool name {name!r} is not one models "
                f"accept ({TOOL_NAME_PATTERN}); set name"
            )
        checked = parameters(resolved.input_schema or ANY_OBJECT)
        if isinstance(checked, str):
            raise ValueError(f"spec.llm.tools.agents {policy.agent!r}: {checked}")
        text = policy.description or resolved.description
        spec = ToolSpec(
            name=name,
            description=description(text, f"Ask the agent {policy.agent}."),
            parameters=checked.schema,
            idempotent=policy.idempotent,
        )
        return cls(
            policy.agent, resolved.inbox_subject, spec, checked, policy.timeout.total_seconds()
        )


def build_request(
    config: RuntimeConfig, cause: CloudEvent, call: ToolCall, arguments: dict[str, Any]
) -> CloudEvent:
    """The request for one tool call: its id is the same for the same message and call.

    It keeps the cause's deadline, not one of the tool's timeout: a caller that gave up (or
    died) and asks again later finds the answer stored instead of an expired request; and
    the cause's Workflow, so the callee's model calls count against that Workflow's
    budgets too."""
    scope = f"{config.namespace}/{config.agent}/tools/{call.id}"
    request = cause.follow_up(
        source=f"/{config.namespace}/{config.agent}",
        type=CALL_TYPE,
        data=arguments,
        index=0,
        scope=scope,
        traceparent=tracing.outgoing(cause.traceparent),
        extensions=envelope.workflow_extension(cause),
    )
    replyto = naming.agent_call_reply_subject(config.namespace, config.agent, request.id)
    return request.model_copy(update={"replyto": replyto})


def reply_result(agent: str, reply: CloudEvent) -> ToolResult:
    """The callee's answer for the model: its data, or its error and reason."""
    if reply.type == ERROR_TYPE:
        data = reply.data if isinstance(reply.data, dict) else {"error": reply.data}
        reason = f" ({data['reason']})" if data.get("reason") else ""
        return error_result(f"agent {agent} failed{reason}: {as_text(data.get('error'))}")
    if isinstance(reply.data, bytes):
        return ToolResult(content=f"[{len(reply.data)} bytes of {reply.datacontenttype}]")
    return ToolResult(content=capped(as_text(reply.data)))


class AgentToolBox:
    """The Agents this one may call; ``bound`` to the message being answered."""

    def __init__(
        self,
        callees: list[Callee],
        *,
        nc: NATS,
        js: JetStreamContext,
        config: RuntimeConfig,
        cause: CloudEvent | None = None,
    ) -> None:
        self._callees = unique(callees, lambda callee: callee.spec.name, "agents")
        self._nc = nc
        self._js = js
        self._config = config
        self._cause = cause

    def bound(self, cause: CloudEvent) -> AgentToolBox:
        """The same tools, calling on behalf of ``cause``."""
        return AgentToolBox(
            list(self._callees.values()), nc=self._nc, js=self._js, config=self._config, cause=cause
        )

    async def specs(self) -> list[ToolSpec]:
        return [callee.spec for callee in self._callees.values()]

    def has(self, name: str) -> bool:
        return name in self._callees

    async def call(self, call: ToolCall, arguments: dict[str, Any]) -> ToolResult:
        callee = self._callees.get(call.name)
        if callee is None:
            return error_result(f"{call.name!r} is not a tool of this agent")
        if (problem := callee.parameters.problem(arguments)) is not None:
            return error_result(f"{call.name}: {problem}")
        if self._cause is None:
            return error_result(f"{call.name}: no message is being answered to call it for")
        try:
            request = build_request(self._config, self._cause, call, arguments)
        except envelope.SchemaViolation as error:
            return error_result(f"{call.name}: the request cannot be sent: {error.reason}")
        return await self._ask(callee, request)

    async def _ask(self, callee: Callee, request: CloudEvent) -> ToolResult:
        assert request.replyto is not None
        source = f"/{self._config.namespace}/{callee.agent}"  # as the callee's outputs.py sets it
        subscription = await self._nc.subscribe(request.replyto)
        try:
            stored = await self._stored_reply(request.replyto)
            if stored is not None and (reply := _reply_to(request, source, stored)) is not None:
                return reply_result(callee.agent, reply)
            headers, payload = envelope.to_binary(request)
            headers[Header.MSG_ID.value] = request.id
            try:
                await publish_stored(self._js, callee.inbox_subject, payload, headers)
            except NoStream as error:
                return error_result(f"agent {callee.agent} cannot be reached: {error}")
            except TimeoutError:
                return error_result(f"agent {callee.agent}'s inbox did not store the request")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + callee.timeout
            while (left := deadline - loop.time()) > 0:
                try:
                    msg = await subscription.next_msg(timeout=left)
                except (NatsTimeoutError, TimeoutError):
                    break
                if (reply := _reply_to(request, source, msg)) is not None:
                    return reply_result(callee.agent, reply)
            return error_result(f"agent {callee.agent} did not answer within {callee.timeout:g}s")
        finally:
            await subscription.unsubscribe()

    async def _stored_reply(self, subject: str) -> RawStreamMsg | None:
        try:
            return await self._js.get_last_msg(
                naming.event_log_stream(self._config.namespace), subject
            )
        except NotFoundError:
            return None

    async def aclose(self) -> None:
        return None


def _reply_to(request: CloudEvent, source: str, msg: Msg | RawStreamMsg) -> CloudEvent | None:
    """``msg`` as the reply from ``source`` to ``request``, or None when it is not (malformed,
    or another agent's: whoever may publish to an inbox may aim a reply here)."""
    headers = dict(msg.headers or {})
    try:
        reply = envelope.parse(headers, msg.data or b"")
    except MalformedMessage:
        return None
    if reply.causationid != request.id or reply.source != source:
        return None
    return reply
