"""The model client against the real local model (SmolLM2 on llama-cpp-python's server):
what the scripted server imitates, a real server must accept and answer the same way."""

from __future__ import annotations

from tests.unit.llm_client_support import provider, runtime
from troupe_devcluster.model_server import ModelServer
from troupe_runtime.agent.llm.router import ModelRouter
from troupe_runtime.agent.llm.types import ChatRequest, ToolSpec

QUESTION = [{"role": "user", "content": "Name one colour of the rainbow."}]


def router_for(local_model: ModelServer) -> ModelRouter:
    config = runtime(
        [("local", local_model.model)],
        [provider("local", local_model.base_url, (local_model.model,))],
    )
    return ModelRouter(config, {})


async def test_a_streamed_answer_arrives_in_deltas(local_model: ModelServer) -> None:
    """llama-cpp-python 0.3.36 sends no usage in a stream, asked or not: it is estimated."""
    router = router_for(local_model)
    deltas: list[str] = []

    async def on_delta(text: str) -> None:
        deltas.append(text)

    try:
        completion = await router.complete(ChatRequest(QUESTION, max_tokens=16), on_delta)
    finally:
        await router.aclose()
    assert len(deltas) > 1
    assert "".join(deltas) == completion.message["content"]
    assert completion.usage.tokens_in > 0
    assert completion.usage.tokens_out > 0


async def test_a_forced_tool_call_comes_back_with_its_arguments_and_usage(
    local_model: ModelServer,
) -> None:
    router = router_for(local_model)
    colour = ToolSpec(
        "paint",
        "Paint with a colour",
        {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]},
    )
    request = ChatRequest(
        QUESTION,
        tools=[colour],
        tool_choice={"type": "function", "function": {"name": "paint"}},
        max_tokens=48,
    )
    try:
        completion = await router.complete(request, None)
    finally:
        await router.aclose()
    (call,) = completion.tool_calls
    assert call.name == "paint"
    assert "colour" in call.arguments
    assert not completion.usage.estimated  # answered in one piece, with the server's usage
