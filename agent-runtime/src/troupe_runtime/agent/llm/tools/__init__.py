"""The LLM agent's tools behind the ``ToolBox`` protocol: MCP servers, other Agents, and
Python functions; ``build_toolbox`` (or ``toolbox_factory``, per NATS session) makes the one
the loop uses, once per process; ``bound(toolbox, event)`` (``CompositeToolBox.for_message``)
binds it to each message, which calls to other Agents need."""

from troupe_runtime.agent.llm.tools.base import MAX_RESULT_BYTES, ToolNameClash
from troupe_runtime.agent.llm.tools.composite import (
    CompositeToolBox,
    bound,
    build_toolbox,
    toolbox_factory,
)
from troupe_runtime.agent.llm.tools.mcp import Backoff

__all__ = [
    "MAX_RESULT_BYTES",
    "Backoff",
    "CompositeToolBox",
    "ToolNameClash",
    "bound",
    "build_toolbox",
    "toolbox_factory",
]
