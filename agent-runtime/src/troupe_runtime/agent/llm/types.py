"""What the parts of the LLM agent hand each other: requests, completions, tools, errors.

Messages are OpenAI chat messages as plain dicts (what goes on the wire and into the log).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from troupe_runtime.contract.budget import SpendContext
from troupe_runtime.contract.usage import Usage

Message = dict[str, Any]
"""One chat message: ``{"role": ..., "content": ..., "tool_calls": [...]}``."""

DeltaSink = Callable[[str], Awaitable[None]]
"""Receives each content delta of a streamed completion, in order."""


def content_text(content: Any) -> str | None:
    """A message's content as text: a string, or the text parts of a list; None otherwise."""
    if isinstance(content, str) or content is None:
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return None


@dataclass(frozen=True)
class ToolSpec:
    """One tool as the model sees it (an OpenAI ``function`` tool)."""

    name: str
    description: str
    parameters: dict[str, Any]
    idempotent: bool = False
    destructive: bool = True
    """Whether a call may have destructive effects, as far as anyone says: MCP's default
    (``destructiveHint`` true unless ``readOnlyHint``), and true for tools with no
    annotations (``contract.tool_approvals``)."""

    def openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


@dataclass(frozen=True)
class ToolCall:
    """A call the model asked for; ``arguments`` is the raw JSON text the model wrote."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolResult:
    """What a tool answered, as text for the model; ``is_error`` when it failed."""

    content: str
    is_error: bool = False


@dataclass(frozen=True)
class ChatRequest:
    """One model call, before a provider and model are chosen."""

    messages: list[Message]
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    response_format: dict[str, Any] | None = None
    """E.g. ``{"type": "json_schema", "json_schema": {...}}`` from the output schema."""
    spend: SpendContext | None = None
    """Who asks and in which run: the budgets that apply (None: no budget is checked)."""
    prompt_overhead: int = 0
    """Prompt tokens the loop learnt ``estimate_tokens`` misses (tool schemas, the chat
    template): added to the estimate that holds and rate limits take."""


@dataclass(frozen=True)
class Completion:
    """A model's answer: its message, why it stopped, what it cost."""

    message: Message
    finish_reason: str | None
    usage: Usage
    provider: str
    model: str
    fallbacks: tuple[Fallback, ...] = ()
    """The models tried before this one, and why each was passed over."""

    @property
    def tool_calls(self) -> list[ToolCall]:
        calls = self.message.get("tool_calls")
        result = []
        for index, call in enumerate(calls if isinstance(calls, list) else []):
            call = call if isinstance(call, dict) else {}
            function = call.get("function")
            function = function if isinstance(function, dict) else {}
            result.append(
                ToolCall(
                    id=str(call.get("id") or f"call_{index}"),
                    name=str(function.get("name") or ""),
                    arguments=str(function.get("arguments") or ""),
                )
            )
        return result


@dataclass(frozen=True)
class Fallback:
    """A model passed over: ``reason`` is rate_limited, unavailable, timeout or circuit_open."""

    provider: str
    model: str
    reason: str
    error: str


class ModelCaller(Protocol):
    """Asks the chain of models (fallback, breakers, limits); what the loop calls."""

    async def complete(self, request: ChatRequest, on_delta: DeltaSink | None) -> Completion: ...


class ToolBox(Protocol):
    """Every tool an agent has (MCP, agents, functions), behind one interface."""

    async def specs(self) -> list[ToolSpec]: ...

    async def call(self, call: ToolCall, arguments: dict[str, Any]) -> ToolResult: ...

    async def aclose(self) -> None: ...


# Failures a model call ends in; the loop turns them into settlements.


class ModelError(Exception):
    """A model call failed."""


class RateLimited(ModelError):
    """429 from every model of the chain; ``retry_after`` seconds, from the header."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelUnavailable(ModelError):
    """5xx, a timeout or a refused connection from every model tried; worth a retry later."""


class ModelRejected(ModelError):
    """400, 401, 403, 404, 413 or context length exceeded: the same request fails again.

    The message is the provider's own (redacted), for the dead letter.
    """

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


class InvalidModelOutput(ModelError):
    """The final answer violates the output schema even after the repair turn."""


class DeferMessage(Exception):
    """Hand the message back for ``delay`` seconds without burning an attempt.

    The loop raises it when a 429's Retry-After outlasts the handler's remaining time.
    ``deferrals`` counts this message's deferrals so far, this one included (the loop
    reads the earlier ones from its journal): the runtime allows ``MAX_DEFERRALS``
    (``contract/llm.py``), then dead-letters the message as ``rate-limited``.
    """

    def __init__(self, message: str, *, delay: float, deferrals: int) -> None:
        super().__init__(message)
        self.delay = delay
        self.deferrals = deferrals


class ParkMessage(Exception):
    """The message's conversation waits for a person's decision on a tool call: it is
    journaled (``parked``) and its request filed, so the runtime acknowledges the message
    with no reply yet; the decision resumes it (``approvals.py``)."""

    def __init__(self, approval: str, tool: str) -> None:
        super().__init__(f"the call of {tool!r} waits for the decision of Approval {approval}")
        self.approval = approval
        self.tool = tool
