"""The LLM agent's tools behind the ``ToolBox`` protocol: MCP servers, other Agents, and
Python functions; ``build_toolbox`` makes the one the loop uses."""

from troupe_runtime.agent.llm.tools.base import MAX_RESULT_BYTES, ToolNameClash
from troupe_runtime.agent.llm.tools.composite import CompositeToolBox, build_toolbox
from troupe_runtime.agent.llm.tools.mcp import Backoff

__all__ = ["MAX_RESULT_BYTES", "Backoff", "CompositeToolBox", "ToolNameClash", "build_toolbox"]
