"""Problems: what is wrong with a spec that only a person can fix.

A pass that finds one reports Ready=False and Stalled=True with the problem's reason,
naming the field, and changes nothing in the cluster or in NATS until it is fixed:
retrying cannot help, so the operator does not retry with backoff either.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec, for the Stalled condition."""

    field: str
    """The spec field it comes from, as ``spec.contract.inputSchema``."""
    reason: str
    """CamelCase, for machines: ``InvalidSchema``, ``SubjectConflict``…"""
    message: str
    """For people: what is wrong and what to do; never a secret."""

    def sentence(self) -> str:
        return f"{self.field}: {self.message}"


class SpecRejected(Exception):
    """Raised by a step of a pass (NATS refusing a stream, the API server refusing an
    object) when the spec, not the world, is at fault."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(problem.sentence() for problem in problems))
        self.problems = problems
