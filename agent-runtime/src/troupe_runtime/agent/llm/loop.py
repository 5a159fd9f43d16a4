"""The agent loop of one message: ask the model, run the tools it asks for, until it answers.

Each turn: fit the history to the context window, ask the ``ModelCaller`` (tools from the
``ToolBox``; ``toolChoice: required`` forces a tool on the first turn only, by name when
there is one tool, which grammar-constrains small local models; ``response_format`` from
the contract's ``outputSchema``), journal the answer *before* running its tool calls, then
run them one after the other, journaling each result.

Crash safety (``journal.py``): an answered turn is never asked again and a finished tool
call never run again; a non-idempotent call journaled as started but not finished is not run
again either: the model is told it was interrupted. An idempotent tool that raises is tried
once more. Whatever the model writes — unknown tools, arguments that are not a JSON object —
becomes an error result the model reads, never a crash.

The final answer is the first one without tool calls. With an ``outputSchema`` it must be
JSON valid against it (a fenced ```json block is accepted); a violation gets one repair turn
that quotes the error, then ``InvalidModelOutput`` (dead letter ``invalid-output``). So does
a model still asking for tools on turn ``maxTurns``: retrying would replay the same
conversation. The output is the parsed object; without a schema it is ``{"content", "model",
"usage"}`` like the legacy ``llm`` handler's, ``usage`` in OpenAI's shape, summed over the
message's turns.

Budgets: each turn's request carries the turn's ``SpendContext`` (``spend``), by which the
router holds on the budgets that apply. A hard limit's refusal (``BudgetExceeded``) ends
the loop: with ``spec.llm.onBudgetExceeded: answer`` and no ``outputSchema`` the final answer
is what the loop has, ``{"content": <the last assistant text>, "model", "usage",
"stopped": "budget-exceeded"}``; otherwise it is raised (dead letter ``budget-exceeded``).
A structured answer cannot be made up from a partial conversation, so a schema always
dead-letters.

Sessions (``contract.sessions``): with ``stop`` given, the loop asks it at each turn
boundary (before every model call but the message's first) whether a newer message of its
session told it to stop. ``interrupt``: the answer is what it has so far, ``{"content",
"model", "usage", "stopped": "interrupted"}`` (with an ``outputSchema``, ``SessionStopped``,
dead letter ``session-interrupted``); ``rollback``: ``SessionStopped``, dead letter
``session-rolled-back``.

Approvals (``spec.llm.approvals``): a call its rule guards runs only once the journal holds
a decision for it. Without one the ``ApprovalGate`` journals the message as parked, files
the request and raises ``ParkMessage``: the message is acknowledged, and the decision
resumes the conversation from the journal. Approved, the tool runs; denied (or timed out
under ``onTimeout: reject``), the model reads an error result naming who decided and why,
and goes on.

429s: a Retry-After that fits in the handler's time is waited out in place, reporting
progress, and the same turn is asked again (no attempt burnt); a longer one is journaled as
``deferred-<k>`` and raised as ``DeferMessage``. Each turn and each tool call reports progress,
so the Agent's ``timeout`` bounds every step, and the event's deadline the whole.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from troupe_runtime.agent.llm.history import Offloader, fit, history_budget
from troupe_runtime.agent.llm.journal import Decision, Journal, ResumeState, call_key
from troupe_runtime.agent.llm.streaming import TokenStream
from troupe_runtime.agent.llm.tokens import estimate_tokens
from troupe_runtime.agent.llm.types import (
    ChatRequest,
    Completion,
    DeferMessage,
    DeltaSink,
    InvalidModelOutput,
    Message,
    ModelCaller,
    RateLimited,
    ToolBox,
    ToolCall,
    ToolResult,
    ToolSpec,
    content_text,
)
from troupe_runtime.agent.schemas import ContractChecker, SchemaViolation
from troupe_runtime.contract.budget import BudgetExceeded, SpendContext
from troupe_runtime.contract.dead_letters import DeadLetterReason
from troupe_runtime.contract.llm_policy import LlmPolicy
from troupe_runtime.contract.sessions import (
    INTERRUPTED_STOP,
    INTERRUPTED_STRUCTURED,
    ROLLED_BACK,
    SessionStopped,
    StopMark,
)
from troupe_runtime.contract.usage import Usage

INTERRUPTED = (
    "error: this call of {name!r} was started but the agent restarted before it finished; "
    "it was not run again because the tool is not idempotent. Its effect is unknown."
)
REPAIR = (
    "Your answer is not valid output: {reason}. Answer again with only the JSON value the "
    "schema asks for, and nothing else."
)
BUDGET_STOP = "budget-exceeded"
"""``stopped`` of an answer cut short by a Budget's hard limit."""
MAX_IN_PLACE_WAITS = 5
"""429 waits in place per turn before the message is deferred instead."""
PROGRESS_SECONDS = 5.0
"""How often a wait in place reports progress (well within any ackWait)."""
_FENCED = re.compile(r"^\s*```(?:json)?\s*\n(.*)\n\s*```\s*$", re.DOTALL)
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_-]")


DENIED = "error: {decided_by} denied this call of {name!r}, so it did not run{why}."
TIMED_OUT = (
    "error: nobody decided on this call of {name!r} within its approval timeout, so it did not run."
)
UNGATED = "error: the call of {name!r} needs a person's approval, which this agent cannot ask for."


class ApprovalGate(Protocol):
    """Parks a call that waits for a decision (``approvals.Gate``)."""

    async def park(
        self, turn: int, key: str, call: ToolCall, arguments: dict[str, Any], *, journaled: bool
    ) -> ToolResult:
        """Journal the message as parked (unless ``journaled``), file the request, and raise
        ``ParkMessage``; or the error result the model reads when the message cannot be
        parked (the tool does not run)."""
        ...


def refusal(name: str, decision: Decision) -> str:
    """What the model reads of a call a decision did not let run."""
    if decision.phase == "TimedOut":
        return TIMED_OUT.format(name=name)
    why = f": {decision.reason}" if decision.reason else ""
    return DENIED.format(decided_by=decision.decided_by, name=name, why=why)


class NoFinalAnswer(InvalidModelOutput):
    """The model still asked for tools on the last turn ``maxTurns`` allows."""


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs of the agent's declaration, resolved once."""

    agent: str
    policy: LlmPolicy
    output_schema: dict[str, Any] | None
    context_window: int


@dataclass(frozen=True)
class Answer:
    """The loop's result: the output data, and what the message's turns cost."""

    data: Any
    usage: Usage
    turns: int


def answer_text(message: Message) -> str:
    """The text of an assistant message: a string, or the text parts of a list."""
    return content_text(message.get("content")) or ""


def for_history(message: Message) -> Message:
    """The model's message as the next request carries it: an assistant message with text
    content (``null`` beside tool calls is OpenAI's, but llama.cpp's server refuses it)."""
    content = message.get("content")
    return {
        **message,
        "role": "assistant",
        "content": content if isinstance(content, str | list) else "",
    }


def tool_calls(message: Message) -> list[ToolCall]:
    """The calls an assistant message asks for, as ``Completion`` reads them."""
    return Completion(message, None, Usage(), "", "").tool_calls


def call_keys(calls: list[ToolCall]) -> list[str]:
    """A journal-safe key per call: the model's id made safe, unique within the turn."""
    keys: list[str] = []
    for index, call in enumerate(calls):
        key = _UNSAFE_ID.sub("_", call.id)[:64] or f"call_{index}"
        keys.append(key if key not in keys else f"{key}-{index}")
    return keys


def parse_arguments(text: str) -> dict[str, Any] | str:
    """The arguments as an object, or why they are not one (for the model to read)."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as error:
        return f"error: the arguments are not valid JSON ({error}); send a JSON object"
    if not isinstance(value, dict):
        return f"error: the arguments must be a JSON object, not {type(value).__name__}"
    return value


def parse_final(text: str, checker: ContractChecker) -> Any:
    """The structured answer, or ``SchemaViolation`` saying what is wrong with it."""
    fenced = _FENCED.match(text)
    try:
        data = json.loads(fenced.group(1) if fenced else text)
    except (ValueError, RecursionError) as error:
        raise SchemaViolation(f"the answer is not JSON ({error})") from None
    checker.check_output(data)
    return data


def last_text(messages: list[Message]) -> str:
    """The last assistant text of a conversation (``""`` when the model wrote none)."""
    for message in reversed(messages):
        if message.get("role") == "assistant" and (text := answer_text(message)):
            return text
    return ""


def openai_usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.tokens_in,
        "completion_tokens": usage.tokens_out,
        "total_tokens": usage.tokens,
    }


class Conversation:
    """One message's loop over the model and the tools, resumable from its journal."""

    def __init__(
        self,
        settings: LoopSettings,
        *,
        caller: ModelCaller,
        toolbox: ToolBox,
        journal: Journal,
        offloader: Offloader,
        stream: TokenStream,
        checker: ContractChecker,
        on_completion: Callable[[Completion, Usage], None],
        progress: Callable[[], Awaitable[None]],
        wait_budget: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        spend: Callable[[int], SpendContext] | None = None,
        stop: Callable[[], Awaitable[StopMark | None]] | None = None,
        gate: ApprovalGate | None = None,
    ) -> None:
        self._settings = settings
        self._gate = gate
        self._stop = stop
        """Asked at each turn boundary whether a newer message of the session stops this one."""
        self._spend = spend
        """The ``SpendContext`` of each turn; None: no budget is checked."""
        self._policy = settings.policy
        self._caller = caller
        self._toolbox = toolbox
        self._journal = journal
        self._offloader = offloader
        self._stream = stream
        self._checker = checker
        self._on_completion = on_completion
        self._progress = progress
        self._wait_budget = wait_budget
        self._sleep = sleep
        self._budget = history_budget(settings.context_window, self._policy.max_tokens)
        self._overhead = 0
        """Prompt tokens the estimate missed on the last call (see ``_calibrate``)."""

    async def run(self, opening: list[Message], state: ResumeState) -> Answer:
        """Run (or resume, from ``state``) the loop to its final answer."""
        self._state = state
        if state.fresh:
            state.messages = list(opening)
            state.opening = len(opening)
        specs = {} if self._policy.tool_choice == "none" else await self._specs()
        new: list[Message] = list(opening) if state.fresh else []
        repair = False
        last = state.last_answer
        if last is not None:  # resumed: finish what the last answered turn began
            answer, new, repair = await self._after(state.next_turn - 1, last, specs)
            if answer is not None:
                return answer
        for turn in range(state.next_turn, self._policy.max_turns):
            if turn > 0 and self._stop is not None and (mark := await self._stop()) is not None:
                return await self._stopped_by_session(turn, mark)
            try:
                completion = await self._ask(turn, specs)
            except BudgetExceeded:
                if not self._answers_over_budget():
                    raise
                return await self._stopped(turn)
            completion = dataclasses.replace(completion, message=for_history(completion.message))
            await self._journal_turn(turn, new, completion, repair)
            state.messages.append(completion.message)
            state.last_model = completion.model
            state.next_turn = turn + 1
            state.repairs += 1 if repair else 0
            answer, new, repair = await self._after(turn, completion.message, specs, completion)
            if answer is not None:
                return answer
        raise NoFinalAnswer(
            f"no final answer within maxTurns={self._policy.max_turns}: the model asked for "
            "tools on its last turn (raise spec.llm.maxTurns, or make the prompt ask for an "
            "answer sooner)"
        )

    async def _specs(self) -> dict[str, ToolSpec]:
        return {spec.name: spec for spec in await self._toolbox.specs()}

    async def _after(
        self,
        turn: int,
        message: Message,
        specs: dict[str, ToolSpec],
        completion: Completion | None = None,
    ) -> tuple[Answer | None, list[Message], bool]:
        """After an answered turn: run its tools, or take it as final (or ask for repair).

        Returns the answer when there is one, else the messages new to the next turn and
        whether the next turn is a repair."""
        calls = tool_calls(message)
        if calls:
            await self._run_tools(turn, calls, specs)
            await self._stream.done(turn, final=False)
            return None, [], False
        await self._stream.done(turn, final=True)
        try:
            return self._final(message, completion), [], False
        except SchemaViolation as violation:
            if self._state.repairs > 0 or self._state.next_turn >= self._policy.max_turns:
                raise InvalidModelOutput(violation.reason) from None
            request = {"role": "user", "content": REPAIR.format(reason=violation.reason)}
            self._state.messages.append(request)
            return None, [request], True

    def _final(self, message: Message, completion: Completion | None) -> Answer:
        text = answer_text(message)
        usage = self._state.usage
        if self._settings.output_schema is not None:
            data = parse_final(text, self._checker)
        else:
            model = completion.model if completion is not None else self._state.last_model
            data = {"content": text, "model": model, "usage": openai_usage(usage)}
        return Answer(data, usage, self._state.next_turn)

    def _answers_over_budget(self) -> bool:
        return self._policy.on_budget_exceeded == "answer" and self._settings.output_schema is None

    async def _stopped(self, turn: int, why: str = BUDGET_STOP) -> Answer:
        """The answer of a loop stopped before ``turn`` (by a budget, or ``why``): what it
        has so far."""
        await self._stream.done(turn, final=True)
        usage = self._state.usage
        data = {
            "content": last_text(self._state.messages),
            "model": self._state.last_model,
            "usage": openai_usage(usage),
            "stopped": why,
        }
        return Answer(data, usage, self._state.next_turn)

    async def _stopped_by_session(self, turn: int, mark: StopMark) -> Answer:
        """A newer message of the session stops this one before ``turn``."""
        if mark == "rollback":
            raise SessionStopped(DeadLetterReason.SESSION_ROLLED_BACK, ROLLED_BACK)
        if self._settings.output_schema is not None:
            raise SessionStopped(DeadLetterReason.SESSION_INTERRUPTED, INTERRUPTED_STRUCTURED)
        return await self._stopped(turn, INTERRUPTED_STOP)

    def _request(self, turn: int, specs: dict[str, ToolSpec]) -> ChatRequest:
        tools = [] if self._policy.tool_choice == "none" else list(specs.values())
        choice: str | dict[str, Any] | None = None
        forced = False
        if tools:
            choice = "auto"
            if self._policy.tool_choice == "required" and turn == 0:
                forced = True
                choice = (
                    {"type": "function", "function": {"name": tools[0].name}}
                    if len(tools) == 1
                    else "required"
                )
            elif turn == self._policy.max_turns - 1:
                # The last turn must answer: a model that would call tools again (small ones
                # do, result in hand) is told it may not, instead of running out of turns.
                choice = "none"
        schema = self._settings.output_schema
        response_format = None
        if schema is not None and not forced:
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": schema},
            }
        return ChatRequest(
            messages=fit(self._state.messages, self._budget - self._overhead, self._state.opening),
            tools=tools,
            tool_choice=choice,
            temperature=self._policy.temperature,
            max_tokens=self._policy.max_tokens,
            response_format=response_format,
            spend=self._spend(turn) if self._spend is not None else None,
            prompt_overhead=self._overhead,
        )

    async def _ask(self, turn: int, specs: dict[str, ToolSpec]) -> Completion:
        """The model's answer to ``turn``; 429s waited out in place or deferred."""
        request = self._request(turn, specs)
        on_delta: DeltaSink | None = None
        if self._stream.enabled:

            async def on_delta(text: str) -> None:
                await self._stream.delta(text, turn)

        waits = 0
        while True:
            try:
                completion = await self._caller.complete(request, on_delta)
            except RateLimited as error:
                delay = error.retry_after
                if delay is None:
                    raise  # no Retry-After: an ordinary, jittered retry
                if waits < MAX_IN_PLACE_WAITS and delay <= self._wait_budget():
                    waits += 1
                    await self._wait(delay)
                    continue
                index = self._state.deferrals
                await self._journal.deferred(index, delay, str(error))
                raise DeferMessage(
                    f"every model of the chain is rate limited for {delay:g}s: {error}",
                    delay=delay,
                    deferrals=index + 1,
                ) from error
            self._calibrate(request, completion)
            return completion

    def _calibrate(self, request: ChatRequest, completion: Completion) -> None:
        """Learn what the estimate misses from the provider's own count of the prompt: the
        tool schemas, the chat template, text denser than 4 characters a token. The next
        history is fitted into the budget less that much."""
        usage = completion.usage
        if not usage.estimated and usage.tokens_in > 0:
            self._overhead = max(0, usage.tokens_in - estimate_tokens(request.messages))

    async def _wait(self, delay: float) -> None:
        """Wait ``delay`` seconds, telling JetStream and the timeout we are still here."""
        loop = asyncio.get_running_loop()
        until = loop.time() + delay
        while (left := until - loop.time()) > 0:
            await self._progress()
            await self._sleep(min(left, PROGRESS_SECONDS))
        await self._progress()

    async def _journal_turn(
        self, turn: int, new: list[Message], completion: Completion, repair: bool
    ) -> None:
        self._state.usage = self._state.usage + completion.usage
        self._on_completion(completion, self._state.usage)
        if completion.fallbacks:
            await asyncio.gather(
                self._journal.turn(turn, new, completion, repair=repair),
                self._journal.fallbacks(turn, completion.fallbacks),
            )
        else:
            await self._journal.turn(turn, new, completion, repair=repair)
        await self._progress()

    async def _run_tools(
        self, turn: int, calls: list[ToolCall], specs: dict[str, ToolSpec]
    ) -> None:
        for key, call in zip(call_keys(calls), calls, strict=True):
            if call_key(turn, key) in self._state.completed:
                continue  # finished before a crash; its result is in the history
            await self._stream.tool(call.name, turn)
            result = await self._result(turn, key, call, specs.get(call.name), specs)
            object_name = f"{self._journal.correlation_id}/tool-{turn}-{key}"
            result, offloaded = await self._offloader.bounded(result, object_name)
            message = {"role": "tool", "tool_call_id": call.id, "content": result.content}
            await self._journal.tool_finished(turn, key, message, offloaded)
            self._state.completed[call_key(turn, key)] = message
            self._state.messages.append(message)
            await self._progress()

    async def _result(
        self,
        turn: int,
        key: str,
        call: ToolCall,
        spec: ToolSpec | None,
        specs: dict[str, ToolSpec],
    ) -> ToolResult:
        if spec is None:
            known = ", ".join(sorted(specs)) or "none"
            return ToolResult(
                f"error: there is no tool {call.name!r}; the tools are: {known}", True
            )
        arguments = parse_arguments(call.arguments)
        if isinstance(arguments, str):
            return ToolResult(arguments, True)
        if self._policy.approvals.guards(
            call.name, destructive=spec.destructive, arguments=arguments
        ):
            decision = self._state.decisions.get(call_key(turn, key))
            if decision is None:
                if self._gate is None:
                    return ToolResult(UNGATED.format(name=call.name), True)
                parked = call_key(turn, key) in self._state.parked
                return await self._gate.park(turn, key, call, arguments, journaled=parked)
            if not decision.approved:
                return ToolResult(refusal(call.name, decision), True)
        if not spec.idempotent:
            if call_key(turn, key) in self._state.started:
                return ToolResult(INTERRUPTED.format(name=call.name), True)
            await self._journal.tool_started(turn, key, call.name)
            self._state.started.add(call_key(turn, key))
        # Models reuse call ids (a small one says call_0 every turn); the tools get one unique
        # in the message, which an Agent called as a tool derives its request's id from.
        unique = ToolCall(call_key(turn, key), call.name, call.arguments)
        try:
            return await self._toolbox.call(unique, arguments)
        except Exception as error:
            if not spec.idempotent:
                return _failed(call, error)
        try:  # an idempotent tool gets one more try
            return await self._toolbox.call(unique, arguments)
        except Exception as error:
            return _failed(call, error)


def _failed(call: ToolCall, error: Exception) -> ToolResult:
    return ToolResult(f"error: the tool {call.name!r} failed: {error}", True)
