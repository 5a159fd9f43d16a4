"""The agent runtime: fetches an agent's messages, enforces its policies, runs its handler.

Handler authors import what a handler receives and may raise from here:
``from troupe_runtime.agent import AgentError, Context``.
"""

from troupe_runtime.agent.context import AgentError, Context

__all__ = ["AgentError", "Context"]
