"""The API server's refusal of a built object, traced back to the Agent field it came from."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from troupe_operator.api import AgentSpec
from troupe_operator.builders import workload
from troupe_operator.builders.pods import Owner
from troupe_operator.builders.rejections import (
    RefusedField,
    parse_path,
    rejection_problems,
    render_path,
    spec_field,
)

OWNER = Owner("team", "writer", "uid-1")
# Values the models accept; the tests pretend the API server refused them.
RAW: dict[str, Any] = {
    "role": "writes",
    "runtime": {
        "env": [{"name": "GOOD", "value": "1"}, {"name": "ODD", "value": "x"}],
        "sidecars": [{"name": "proxy", "image": "envoy"}, {"name": "odd", "image": "x"}],
        "resources": {"limits": {"cpu": "64"}},
        "tolerations": [{"key": "k", "value": "v"}],
    },
}


def _built() -> tuple[dict[str, Any], list[Any]]:
    spec = AgentSpec.model_validate(RAW)
    config = workload.build_runtime_config(OWNER, spec, "nats://nats:4222")
    deployment = workload.build_deployment(OWNER, spec, config)
    dumped = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    return deployment, [RAW, dumped]


def _index_of(containers: list[dict[str, Any]], name: str, image: str) -> int:
    return next(i for i, c in enumerate(containers) if c["name"] == name and c["image"] == image)


def test_a_sidecar_is_named_by_its_place_in_the_spec() -> None:
    deployment, specs = _built()
    containers = deployment["spec"]["template"]["spec"]["containers"]
    index = _index_of(containers, "odd", "x")

    field = spec_field(deployment, specs, f"spec.template.spec.containers[{index}].name")

    assert field == "spec.runtime.sidecars[1].name"


def test_an_env_var_is_named_by_its_place_in_the_spec() -> None:
    deployment, specs = _built()
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    index = next(i for i, e in enumerate(env) if e["name"] == "ODD")

    field = spec_field(deployment, specs, f"spec.template.spec.containers[0].env[{index}].name")

    assert field == "spec.runtime.env[1].name"


def test_a_quantity_and_a_toleration_are_named() -> None:
    deployment, specs = _built()

    assert (
        spec_field(deployment, specs, "spec.template.spec.containers[0].resources.limits[cpu]")
        == "spec.runtime.resources.limits.cpu"
    )
    assert (
        spec_field(deployment, specs, "spec.template.spec.tolerations[0].operator")
        == "spec.runtime.tolerations[0].operator"
    )


def test_a_config_map_refusal_names_the_spec() -> None:
    config_map = {"kind": "ConfigMap", "metadata": {"name": "writer-runtime"}, "data": {}}

    (problem,) = rejection_problems(
        config_map, [RAW], "ConfigMap is invalid", [RefusedField("[]", "Too long")]
    )

    assert (problem.field, problem.reason) == ("spec", "ObjectRejected")
    assert "Too long" in problem.message
    assert "writer-runtime" in problem.message


def test_a_field_the_spec_does_not_hold_is_named_in_the_object() -> None:
    deployment, specs = _built()

    assert spec_field(deployment, specs, "spec.selector") == "Deployment writer spec.selector"


KEYS = st.one_of(
    st.integers(min_value=0, max_value=99),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
    st.from_regex(r"[a-z0-9./-]{1,10}", fullmatch=True).filter(lambda k: not k.isdigit()),
)


@given(st.lists(KEYS, min_size=1, max_size=6).filter(lambda p: isinstance(p[0], str)))
def test_paths_render_and_parse_back(path: list[str | int]) -> None:
    assert parse_path(render_path(tuple(path))) == tuple(path)
