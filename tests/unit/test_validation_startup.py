"""A config the runtime or engine cannot use: one log line naming the problem, exit 1.

The pod's termination message is its log's tail (``FallbackToLogsOnError``), so that line
is what the status shows; nothing here connects anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from tests.unit.test_validation import SCHEMAS
from troupe_operator.api import AgentSpec
from troupe_operator.builders import validation, workload
from troupe_operator.builders.pods import Owner
from troupe_runtime.agent import __main__ as agent_main
from troupe_runtime.agent.runtime import Runtime
from troupe_runtime.contract import pod
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.config_file import InvalidConfig, config_path
from troupe_runtime.contract.engine_config import EngineConfig, EngineStep
from troupe_runtime.contract.policies import Handler
from troupe_runtime.workflow import __main__ as engine_main


def _write(tmp_path: Path, config: Any) -> Path:
    path = tmp_path / "config.json"
    path.write_text(config if isinstance(config, str) else config.to_json())
    return path


def _one_error_line(err: str) -> str:
    (line,) = err.splitlines()
    record = json.loads(line)
    assert record["level"] == "error"
    message: str = record["message"]
    return message


def _agent(**contract: Any) -> RuntimeConfig:
    return RuntimeConfig.model_validate({"agent": "a", "namespace": "n", "contract": contract})


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (None, "cannot read the config"),
        ("{not json", "is invalid: (root): Invalid JSON"),
        ('{"agent": "a"}', "is invalid: namespace: Field required"),
        (_agent(inputSchema={"pattern": "(?=x)"}), "contract.inputSchema: pattern '(?=x)'"),
        (_agent(outputSchema={"$ref": "#/nowhere"}), "contract.outputSchema: $ref '#/nowhere'"),
        (
            RuntimeConfig(
                agent="a",
                namespace="n",
                handler=Handler(type="python", entrypoint="no_such_module_x:f"),
            ),
            "handler.entrypoint 'no_such_module_x:f' cannot be imported: ModuleNotFoundError",
        ),
    ],
)
def test_the_runtime_refuses_a_config_it_cannot_use_in_one_line_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: Any, named: str
) -> None:
    path = tmp_path / "absent.json" if config is None else _write(tmp_path, config)

    assert agent_main.main(["--config", str(path)]) == agent_main.EXIT_INVALID_CONFIG

    message = _one_error_line(capsys.readouterr().err)
    assert message.startswith("invalid config, not starting: ")
    assert named in message


def test_the_runtime_reads_the_mounted_file_unless_told_otherwise(tmp_path: Path) -> None:
    assert config_path(None, {}) == Path(pod.CONFIG_PATH)
    assert config_path(None, {pod.CONFIG_PATH_ENV: "/x/c.json"}) == Path("/x/c.json")
    assert config_path(tmp_path, {pod.CONFIG_PATH_ENV: "/x/c.json"}) == tmp_path


def test_a_valid_config_builds_a_runtime_with_its_schemas_compiled(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"f": {"pattern": r"^\p{L}+$"}}}
    path = _write(tmp_path, _agent(inputSchema=schema))

    runtime = agent_main.build_runtime(path, {}, grace=1.0, liveness_bound=10.0)

    assert isinstance(runtime, Runtime)
    assert runtime.config.contract.input_schema == schema


def test_the_config_file_is_compact_json() -> None:
    text = _agent(inputSchema={"type": "object"}).to_json()

    assert "\n" not in text
    assert ", " not in text
    assert '": ' not in text


def _engine(expression: str, compensation: str | None = None) -> EngineConfig:
    step: dict[str, Any] = {"name": "s", "agent": "x", "subject": "troupe.n.x.in.p0"}
    step["input"] = {"k": expression}
    if compensation is not None:
        step["compensation"] = {"subject": "troupe.n.y.in.p0", "input": {"c": compensation}}
    return EngineConfig(
        workflow="w", namespace="n", trigger_subject="t", steps=[EngineStep.model_validate(step)]
    )


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (None, "cannot read the config"),
        (_engine("trigger.["), "step s: input.k: 'trigger.[' is not a valid JMESPath"),
        (_engine("trigger", "a ||"), "step s: compensation.input.c: 'a ||' is not a valid"),
    ],
)
def test_the_engine_refuses_a_config_it_cannot_use_in_one_line_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: Any, named: str
) -> None:
    path = tmp_path / "absent.json" if config is None else _write(tmp_path, config)

    assert engine_main.main(["--config", str(path)]) == engine_main.EXIT_INVALID_CONFIG

    assert named in _one_error_line(capsys.readouterr().err)


def test_the_engine_loads_a_config_whose_expressions_compile(tmp_path: Path) -> None:
    path = _write(tmp_path, _engine("trigger.items[0]", "steps.s.output"))

    assert engine_main.load_config(path, {}).steps[0].input == {"k": "trigger.items[0]"}


def test_an_unreadable_config_names_its_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig, match=str(tmp_path / "nope.json")):
        engine_main.load_config(tmp_path / "nope.json", {})


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(schema=SCHEMAS)
def test_the_runtime_starts_from_the_config_file_of_every_agent_with_no_problem(
    tmp_path: Path, schema: dict[str, Any]
) -> None:
    spec = AgentSpec.model_validate({"role": "r", "contract": {"inputSchema": schema}})
    problems = validation.agent_problems(spec)
    config = workload.build_runtime_config(Owner("n", "a", uid="u"), spec, "nats://nats:4222")
    path = tmp_path / "config.json"
    path.write_text(config.to_json())

    try:
        agent_main.build_runtime(path, {}, grace=1.0, liveness_bound=10.0)
        started = True
    except InvalidConfig:
        started = False

    assert started == (not problems)
