"""Handlers that Agents of the operator's workflow tests run in real runtime processes.

The process node starts each container with its pod's directory as working directory:
an Agent using these sets ``PYTHONPATH`` to the repository root (``operator_support.REPO``).
"""

from __future__ import annotations

import os
from typing import Any

from troupe_runtime.agent.context import Context

NAME_ENV = "TEST_APPEND_NAME"


async def append_name(ctx: Context) -> Any:
    """The input list with this agent's name (from ``$TEST_APPEND_NAME``) appended."""
    return [*(ctx.event.data or []), os.environ[NAME_ENV]]


async def refuse(ctx: Context) -> Any:
    """Fails every message: a step's agent that is down, for fallback tests."""
    raise RuntimeError(f"{os.environ[NAME_ENV]} is down")
