"""Cycles in a Workflow's DAG: what CEL cannot check, the operator reports in status."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from troupe_operator.api import WorkflowSpec


def find_cycles(edges: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Each cycle's steps in dependency order (Tarjan's strongly connected components).

    ``edges`` maps a step to the steps it depends on; unknown names are ignored
    (the API server already refused them).
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in edges:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] != index[node]:
            return
        component = []
        while True:
            member = stack.pop()
            on_stack.discard(member)
            component.append(member)
            if member == node:
                break
        if len(component) > 1 or node in edges.get(node, ()):
            cycles.append(component[::-1])

    for node in edges:
        if node not in index:
            visit(node)
    return cycles


def workflow_cycles(spec: WorkflowSpec) -> list[list[str]]:
    return find_cycles({step.name: step.depends_on for step in spec.steps})


def unknown_agents(spec: WorkflowSpec, agents: set[str]) -> dict[str, list[str]]:
    """Agent names the steps refer to that ``agents`` lacks, each with what names it:
    a step, a step's fallback (``charge.fallbacks``) or its compensation
    (``charge.compensation``). An approval step names no Agent: a person decides it."""
    missing: dict[str, list[str]] = {}
    for step in spec.steps:
        if step.agent_ref is not None and step.agent_ref not in agents:
            missing.setdefault(step.agent_ref, []).append(step.name)
        for fallback in step.fallbacks:
            if fallback not in agents:
                missing.setdefault(fallback, []).append(f"{step.name}.fallbacks")
        if step.compensation is not None and step.compensation.agent_ref not in agents:
            missing.setdefault(step.compensation.agent_ref, []).append(f"{step.name}.compensation")
    return missing
