"""The research team's retriever: it asks the research library, an MCP tool server.

The analyst and the writer are LLM agents (``agents.yaml``); the retriever is the one
Python handler. It calls the library's ``lookup`` tool over streamable HTTP with the
official ``mcp`` SDK, hands the facts on to the analyst, and counts each topic's popularity
in the shared ``notes`` bucket under revision checks.

Why not an LLM agent: SmolLM2-135M, the demo's local model, calls a tool reliably only
when forced, and cannot yet make use of the result in a second turn; the facts the team
works from should be the library's, word for word.
"""

from __future__ import annotations

import os
from typing import Any

from mcp import Client
from mcp_types import TextContent

from troupe_runtime.agent import AgentError, Context

LIBRARY_URL = os.environ.get("RESEARCH_LIBRARY_URL", "http://127.0.0.1:18081/mcp")


def _topic(ctx: Context) -> str:
    data = ctx.event.data
    topic = data.get("topic") if isinstance(data, dict) else None
    if not isinstance(topic, str) or not topic:
        raise AgentError("NoTopic", "the request needs a topic")
    return topic.lower()


async def retrieve(ctx: Context) -> dict[str, Any]:
    """Look the topic up in the library; count the request towards the topic's popularity."""
    topic = _topic(ctx)
    async with Client(LIBRARY_URL) as library:
        result = await library.call_tool("lookup", {"topic": topic})
    text = "\n".join(block.text for block in result.content if isinstance(block, TextContent))
    if result.is_error:
        raise AgentError("UnknownTopic", f"the library has nothing on {topic!r}: {text[:200]}")
    notes = await ctx.state.bucket("notes")
    await notes.update(f"popularity.{topic}", lambda count: (count or 0) + 1)
    # One fact per line, strongest first: as a list, a small model copies them one by one.
    return {"topic": topic, "facts": text.splitlines()}
