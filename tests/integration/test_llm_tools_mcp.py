"""MCP tools against a real MCP server (the SDK's MCPServer over streamable HTTP, in a
subprocess): allow lists, timeouts, idempotency hints, capped and failed results, a server
that is down at start-up or dies, and arguments the model gets wrong."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.runtime_harness import eventually
from tests.support.mcp_servers import McpTestServer, hostile_mcp_server, mcp_server
from troupe_runtime.agent.llm.tools import MAX_RESULT_BYTES, Backoff, ToolNameClash
from troupe_runtime.agent.llm.tools.mcp import CONNECT_TIMEOUT_SECONDS, McpToolBox
from troupe_runtime.agent.llm.types import ToolCall
from troupe_runtime.contract.llm_policy import McpServer

__all__ = ["hostile_mcp_server", "mcp_server"]

FAST = Backoff(first=0.05, most=0.2)


def toolbox(server: McpTestServer, **policy: Any) -> McpToolBox:
    fields = {"name": "tools", "url": server.url, "timeout": "5s", **policy}
    return McpToolBox.from_policy([McpServer.model_validate(fields)], [], FAST)


def call(name: str, call_id: str = "c1") -> ToolCall:
    return ToolCall(id=call_id, name=name, arguments="")


async def test_only_allowed_tools_are_offered_and_a_disallowed_one_is_refused_without_running(
    mcp_server: McpTestServer,
) -> None:
    box = toolbox(mcp_server, allow=["record", "lookup"])
    await box.start()
    try:
        assert sorted(spec.name for spec in await box.specs()) == ["lookup", "record"]
        refused = await box.call(call("forbidden"), {})
        assert refused.is_error
        assert "not a tool of this agent" in refused.content
        answered = await box.call(call("record"), {"text": "hello"})
        assert answered == answered.__class__("recorded hello", is_error=False)
    finally:
        await box.aclose()
    assert mcp_server.calls("forbidden") == []
    assert mcp_server.calls("record") == ["hello"]


async def test_without_an_allow_list_every_listed_tool_is_offered_with_its_schema(
    mcp_server: McpTestServer,
) -> None:
    box = toolbox(mcp_server)
    await box.start()
    try:
        specs = {spec.name: spec for spec in await box.specs()}
    finally:
        await box.aclose()
    assert set(specs) == {
        "record", "lookup", "slow", "huge", "fails", "picture", "forbidden", "erase", "peek"
    }  # fmt: skip
    assert specs["record"].parameters["required"] == ["text"]
    assert specs["record"].parameters["properties"]["text"]["type"] == "string"
    assert specs["record"].description == "Records the text and answers it."


async def test_an_allowed_tool_the_server_does_not_list_is_a_start_up_warning_not_a_failure(
    mcp_server: McpTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    box = toolbox(mcp_server, allow=["record", "vanished"])
    with caplog.at_level(logging.WARNING):
        await box.start()
    try:
        assert [spec.name for spec in await box.specs()] == ["record"]
    finally:
        await box.aclose()
    assert "'vanished' is on the allow list but the server does not list it" in caplog.text


async def test_idempotent_hint_or_the_policy_list_marks_a_tool_idempotent_nothing_else(
    mcp_server: McpTestServer,
) -> None:
    box = toolbox(mcp_server, allow=["record", "lookup", "huge"], idempotent=["huge"])
    await box.start()
    try:
        specs = {spec.name: spec.idempotent for spec in await box.specs()}
    finally:
        await box.aclose()
    assert specs == {"record": False, "lookup": True, "huge": True}


async def test_only_a_read_only_or_non_destructive_hint_marks_a_tool_harmless(
    mcp_server: McpTestServer,
) -> None:
    box = toolbox(mcp_server, allow=["erase", "peek", "record", "lookup"])
    await box.start()
    try:
        specs = {spec.name: spec.destructive for spec in await box.specs()}
    finally:
        await box.aclose()
    # record has no annotations and lookup only idempotentHint: MCP's defaults make both
    # possibly destructive; peek says readOnlyHint.
    assert specs == {"erase": True, "peek": False, "record": True, "lookup": True}


async def test_a_tool_slower_than_its_timeout_is_an_error_and_the_next_call_works(
    mcp_server: McpTestServer,
) -> None:
    box = toolbox(mcp_server, timeout="500ms")
    await box.start()
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        slow = await box.call(call("slow"), {"seconds": 5})
        took = loop.time() - started
        after = await box.call(call("lookup"), {"key": "k"})
    finally:
        await box.aclose()
    assert slow.is_error
    assert "did not answer within 0.5s" in slow.content
    assert 0.5 <= took < 2.0
    assert after.content == "value of k"
    assert not after.is_error


async def test_a_call_cancelled_by_the_handlers_timeout_leaves_nothing_running(
    mcp_server: McpTestServer,
) -> None:
    box = toolbox(mcp_server, allow=["slow", "lookup"])
    await box.start()
    try:
        pending = asyncio.create_task(box.call(call("slow"), {"seconds": 30}))
        await eventually(lambda: mcp_server.calls("slow"), "the slow call to start")
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending

        def calls_left() -> list[asyncio.Task[Any]]:
            return [t for t in asyncio.all_tasks() if "call_tool" in repr(t.get_coro())]

        await eventually(lambda: calls_left() == [], "the abandoned call to end")
        assert (await box.call(call("lookup"), {"key": "k"})).content == "value of k"
    finally:
        await box.aclose()


async def test_one_connection_per_server_serves_every_call_even_concurrent_ones(
    mcp_server: McpTestServer,
) -> None:
    box = toolbox(mcp_server, allow=["lookup"])
    await box.start()
    try:
        for key in ("a", "b"):
            assert (await box.call(call("lookup"), {"key": key})).content == f"value of {key}"
        keys = [f"k{n}" for n in range(5)]
        results = await asyncio.gather(*(box.call(call("lookup"), {"key": k}) for k in keys))
    finally:
        await box.aclose()
    assert [result.content for result in results] == [f"value of {k}" for k in keys]
    posts = [line for line in mcp_server.log.read_text().splitlines() if "POST /mcp" in line]
    first_clients = {line.split()[1] for line in posts[:4]}
    assert len(posts) >= 7
    assert len(first_clients) == 1, posts


async def test_a_huge_result_is_capped_before_it_reaches_the_loop(
    mcp_server: McpTestServer,
) -> None:
    box = toolbox(mcp_server, allow=["huge"])
    await box.start()
    try:
        result = await box.call(call("huge"), {"size": 3 * MAX_RESULT_BYTES})
    finally:
        await box.aclose()
    assert not result.is_error
    assert result.content.startswith("x" * 1000)
    assert len(result.content.encode()) < MAX_RESULT_BYTES + 200
    assert f"[truncated: {3 * MAX_RESULT_BYTES} bytes, the first {MAX_RESULT_BYTES} kept]" in (
        result.content
    )


async def test_is_error_from_the_server_is_an_error_result_with_its_text(
    mcp_server: McpTestServer,
) -> None:
    box = toolbox(mcp_server, allow=["fails"])
    await box.start()
    try:
        result = await box.call(call("fails"), {"reason": "no disk"})
    finally:
        await box.aclose()
    assert result.is_error
    assert "failed on purpose: no disk" in result.content


async def test_images_become_placeholders_beside_the_text(mcp_server: McpTestServer) -> None:
    box = toolbox(mcp_server, allow=["picture"])
    await box.start()
    try:
        result = await box.call(call("picture"), {})
    finally:
        await box.aclose()
    assert result.content == "[image: image/png, 100 bytes]\na caption"


@pytest.mark.parametrize(
    "arguments",
    [{}, {"text": 1}, {"text": "a", "extra": {"deep": [1, 2]}}, {"text": None}],
    ids=["missing", "wrong type", "unknown", "null"],
)
async def test_arguments_that_do_not_fit_the_schema_are_an_error_and_nothing_runs(
    mcp_server: McpTestServer, arguments: dict[str, Any]
) -> None:
    box = toolbox(mcp_server, allow=["record"])
    await box.start()
    try:
        result = await box.call(call("record"), arguments)
    finally:
        await box.aclose()
    if "extra" in arguments:  # the SDK's schema allows unknown properties: they reach it
        assert not result.is_error
        return
    assert result.is_error
    assert "arguments violate the tool's schema" in result.content
    assert mcp_server.calls("record") == []


async def test_a_server_down_at_start_up_wedges_nothing_and_its_tools_appear_when_it_is_up(
    mcp_server: McpTestServer,
) -> None:
    mcp_server.stop()
    box = toolbox(mcp_server, allow=["record"])
    loop = asyncio.get_running_loop()
    started = loop.time()
    await box.start()
    assert loop.time() - started < 2.0
    try:
        assert await box.specs() == []
        down = await box.call(call("record"), {"text": "early"})
        assert down.is_error
        assert "not a tool of this agent" in down.content
        mcp_server.start()

        async def offered() -> bool:
            return [spec.name for spec in await box.specs()] == ["record"]

        await eventually(offered, "the record tool to be offered once the server is up")
        assert (await box.call(call("record"), {"text": "late"})).content == "recorded late"
    finally:
        await box.aclose()
    assert mcp_server.calls("record") == ["late"]


async def test_a_call_while_the_server_is_down_is_an_error_and_calls_recover_when_it_is_back(
    mcp_server: McpTestServer,
) -> None:
    box = toolbox(mcp_server, allow=["record"])
    await box.start()
    try:
        assert (await box.call(call("record"), {"text": "before"})).content == "recorded before"
        mcp_server.stop()
        down = await box.call(call("record"), {"text": "during"})
        assert down.is_error
        again = await box.call(call("record"), {"text": "during"})
        assert again.is_error
        assert "unreachable" in again.content
        mcp_server.start()

        async def answered() -> bool:
            result = await box.call(call("record"), {"text": "after"})
            return result.content == "recorded after"

        await eventually(answered, "a call to succeed once the server is back")
    finally:
        await box.aclose()
    assert mcp_server.calls("record")[0] == "before"
    assert "during" not in mcp_server.calls("record")


async def test_a_server_that_accepts_but_never_answers_holds_up_no_turn() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        server = McpServer(name="silent", url=f"http://127.0.0.1:{port}/mcp")
        box = McpToolBox.from_policy([server], [], Backoff(first=0.01, most=0.01))
        loop = asyncio.get_running_loop()
        try:
            started = loop.time()
            await box.start()
            assert loop.time() - started < CONNECT_TIMEOUT_SECONDS + 2
            for _ in range(3):
                started = loop.time()
                assert await box.specs() == []
                assert loop.time() - started < 0.5
                await asyncio.sleep(0.05)
        finally:
            await box.aclose()


async def test_two_servers_listing_one_allowed_name_are_a_start_up_error_naming_both(
    mcp_server: McpTestServer,
) -> None:
    servers = [
        McpServer(name=name, url=mcp_server.url, allow=["lookup"], timeout=timedelta(seconds=5))
        for name in ("left", "right")
    ]
    box = McpToolBox.from_policy(servers, [], FAST)
    try:
        with pytest.raises(
            ToolNameClash, match="'lookup' is listed by MCP servers 'left' and 'right'"
        ):
            await box.start()
    finally:
        await box.aclose()


async def test_a_paged_listing_is_followed_and_tools_a_model_must_not_get_are_skipped(
    hostile_mcp_server: McpTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    box = toolbox(hostile_mcp_server)
    with caplog.at_level(logging.WARNING):
        await box.start()
    try:
        specs = {spec.name: spec for spec in await box.specs()}
        answered = await box.call(call("hinted"), {"q": "x"})
        refused = await box.call(call("lookbehind"), {"q": "x"})
    finally:
        await box.aclose()
    assert sorted(specs) == ["good", "hinted"]
    assert specs["hinted"].idempotent
    assert answered.content == "hinted ran"
    assert refused.is_error
    assert hostile_mcp_server.calls("lookbehind") == []
    for name in ("bad.name", "not_a_schema", "too_large", "lookbehind"):
        assert f"tool {name!r}" in caplog.text


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.sampled_from(["lookup", "record", "forbidden", "", "nope"]), arguments=JSON)
def test_arbitrary_arguments_never_crash_a_call(
    mcp_server: McpTestServer, name: str, arguments: Any
) -> None:
    async def attempt() -> None:
        box = toolbox(mcp_server, allow=["lookup", "record"])
        await box.start()
        try:
            result = await box.call(call(name), arguments)
        finally:
            await box.aclose()
        assert isinstance(result.content, str)
        json.dumps(result.content)

    asyncio.run(attempt())
