"""What only the operator can judge about a spec, checked purely before anything is written.

The CRD's OpenAPI and CEL rules refuse what they can express; what they cannot is found
here and reported as ``Problem``s, each naming its field, so that the object stalls with a
reason instead of the runtime failing in a pod log. The list, honestly:

- ``InvalidSchema``: ``spec.contract.inputSchema`` or ``outputSchema`` is not a schema the
  runtime can run: an unknown ``$schema`` dialect, invalid against its metaschema, a
  ``pattern`` RE2 cannot compile, ``unevaluatedProperties`` beside ``patternProperties``, a
  ``$ref`` that resolves nowhere offline, or nesting too deep to check. The judgement is
  the runtime's own (``troupe_runtime.contract.schema_rules``), and the message carries
  the JSON pointer inside the schema.
- ``InvalidExpression``: a Workflow step's (or its compensation's) input expression is not
  JMESPath (``troupe_runtime.contract.expressions``, which the engine calls too).
- ``ConfigTooLarge``: the runtime's or engine's config would not fit its ConfigMap (the
  API server caps a ConfigMap's data at 1 MiB); the problem names the biggest field.

Everything else the runtime checks when it loads its config is either the models' (the
CRD and the models agree), a Secret's or ConfigMap's presence and keys (checked against
the cluster by the pass, ``Plan.secrets``), or code the operator cannot see (a python
handler's entrypoint).
"""

from __future__ import annotations

import json
from typing import Any

from troupe_operator.api import AgentSpec, WorkflowSpec
from troupe_operator.builders import engine, pods, workload
from troupe_operator.builders.pods import Owner
from troupe_operator.builders.problems import Problem
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.expressions import expression_problem, template_problem
from troupe_runtime.contract.schema_rules import schema_problem

_LONGEST_NAME = "x" * 63
WORST_CASE_OWNER = Owner(_LONGEST_NAME, _LONGEST_NAME, uid="")
"""Names as long as a DNS label can be: the config measured is the largest any namespace
and object name could make it."""

# Where the config's top-level fields come from in the spec, where the names differ.
_AGENT_FIELDS = {"handler": "runtime.handler"}
_ENGINE_FIELDS = {"triggerSubject": "trigger.subject"}


def agent_problems(spec: AgentSpec) -> list[Problem]:
    """Every problem of an Agent's spec that the API server could not refuse."""
    problems = [
        Problem(f"spec.contract.{field}", "InvalidSchema", problem.sentence())
        for field, schema in (
            ("inputSchema", spec.contract.input_schema),
            ("outputSchema", spec.contract.output_schema),
        )
        if schema is not None and (problem := schema_problem(schema)) is not None
    ]
    if problems:  # a schema nested too deep cannot even be serialised: fix that first
        return problems
    config = workload.build_runtime_config(WORST_CASE_OWNER, spec, "")
    return _size_problems("runtime", config.to_json(), _AGENT_FIELDS)


def config_problems(config: RuntimeConfig) -> list[Problem]:
    """ConfigTooLarge for a config the operator resolved (an LLM agent's embeds the specs
    of its ModelProviders)."""
    return _size_problems("runtime", config.to_json(), _AGENT_FIELDS)


def workflow_problems(spec: WorkflowSpec) -> list[Problem]:
    """Every problem of a Workflow's spec that the API server could not refuse."""
    problems: list[Problem] = []
    for index, step in enumerate(spec.steps):
        mappings = [(f"spec.steps[{index}].input", step.input)]
        if step.compensation is not None:
            mappings.append((f"spec.steps[{index}].compensation.input", step.compensation.input))
        problems.extend(
            Problem(f"{where}.{key}", "InvalidExpression", problem)
            for where, expressions in mappings
            for key, expression in expressions.items()
            if (problem := expression_problem(expression)) is not None
        )
        if step.approval is not None and (problem := template_problem(step.approval.message)):
            problems.append(
                Problem(f"spec.steps[{index}].approval.message", "InvalidTemplate", problem)
            )
    config = engine.build_engine_config(WORST_CASE_OWNER, spec, "")
    return problems + _size_problems("engine", config.to_json(), _ENGINE_FIELDS)


def _size_problems(whose: str, config_json: str, renamed: dict[str, str]) -> list[Problem]:
    """ConfigTooLarge, naming the biggest field, when the config would overflow its
    ConfigMap once the operator adds what it resolves (``pods.CONFIG_RESERVE_BYTES``)."""
    size = len(config_json.encode())
    if size <= pods.CONFIG_BUDGET_BYTES:
        return []
    field, field_size = _biggest_field(json.loads(config_json), renamed)
    return [
        Problem(
            field,
            "ConfigTooLarge",
            f"the {whose} config would be {size} bytes, over the {pods.CONFIG_BUDGET_BYTES} "
            f"a ConfigMap can hold ({pods.CONFIG_MAP_LIMIT_BYTES} bytes, less "
            f"{pods.CONFIG_RESERVE_BYTES} for what the operator adds); {field} is the "
            f"biggest part ({field_size} bytes): shrink it",
        )
    ]


def _biggest_field(config: dict[str, Any], renamed: dict[str, str]) -> tuple[str, int]:
    """The spec field whose JSON is the biggest part of ``config``: a top-level field, or
    one level inside it (a schema, a step's input), list items counted one by one."""
    candidates: list[tuple[str, Any]] = []
    for key, value in config.items():
        path = f"spec.{renamed.get(key, key)}"
        if isinstance(value, dict):
            candidates.extend((f"{path}.{sub}", item) for sub, item in value.items())
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    candidates.extend((f"{path}[{index}].{sub}", v) for sub, v in item.items())
                else:
                    candidates.append((f"{path}[{index}]", item))
        else:
            candidates.append((path, value))
    sized = [
        (path, len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()))
        for path, value in candidates
    ]
    return max(sized, key=lambda candidate: candidate[1])
