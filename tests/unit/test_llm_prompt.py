"""The system prompt's template: four placeholders, nothing else evaluated."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from troupe_runtime.agent.llm.prompt import opening, render
from troupe_runtime.contract.llm import LlmRuntime
from troupe_runtime.contract.llm_policy import LlmPolicy

MODEL = {"model": {"provider": "p", "model": "m"}}


def runtime(**fields: object) -> LlmRuntime:
    return LlmRuntime(policy=LlmPolicy.model_validate({**MODEL, **fields}))


def test_placeholders_name_the_input_a_field_of_it_the_agent_and_the_role() -> None:
    data = {"topic": "bees", "n": [1, 2]}
    text = render(
        "{{agent}} ({{ role }}): {{ input.topic }} {{input.n}} {{ input }}",
        data,
        agent="writer",
        role="writes",
    )
    assert text == f"writer (writes): bees [1,2] {json.dumps(data, separators=(',', ':'))}"


def test_an_unknown_placeholder_stays_as_written() -> None:
    assert render("{{ env.HOME }} {{ 1+1 }}", {}, agent="a", role="r") == "{{ env.HOME }} {{ 1+1 }}"


def test_a_bad_expression_renders_null() -> None:
    assert render("{{ input.[ }}", {"a": 1}, agent="a", role="r") == "null"


@given(st.text(max_size=200))
def test_substituted_input_is_never_evaluated_again(hostile: str) -> None:
    text = render("<{{ input.x }}>", {"x": hostile + "{{ agent }}"}, agent="SECRET", role="r")
    assert text == f"<{hostile}{{{{ agent }}}}>"


def test_the_opening_is_the_prompt_then_the_input_as_is_or_as_json(tmp_path: Path) -> None:
    inline = runtime(systemPrompt={"text": "about {{ input.q }}"})
    assert opening(inline, {"q": "x"}, agent="a", role="r") == [
        {"role": "system", "content": "about x"},
        {"role": "user", "content": '{"q":"x"}'},
    ]
    assert opening(runtime(), "plain", agent="a", role="r") == [
        {"role": "user", "content": "plain"}
    ]
    prompt = tmp_path / "prompt"
    prompt.write_text("from a file: {{ role }}")
    mounted = LlmRuntime(
        policy=LlmPolicy.model_validate(
            {**MODEL, "systemPrompt": {"configMapKeyRef": {"name": "c", "key": "prompt"}}}
        ),
        system_prompt_file=prompt,
    )
    assert opening(mounted, 1, agent="a", role="r")[0]["content"] == "from a file: r"
