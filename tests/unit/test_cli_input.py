"""What the CLI accepts as JSON input: strict JSON, with a clear error for anything else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from troupe_cli import nats_ops
from troupe_cli.errors import CliError
from troupe_cli.main import parse_json
from troupe_runtime.contract import envelope
from troupe_runtime.contract.envelope import CloudEvent


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"x": -Infinity}'])
def test_nan_and_infinity_are_refused_with_a_clear_error(text: str) -> None:
    with pytest.raises(CliError, match="is not a JSON number"):
        parse_json(text, "the run input")


def test_json_nested_past_the_recursion_limit_is_refused_with_a_clear_error() -> None:
    with pytest.raises(CliError, match="the run input is not JSON"):
        parse_json("[" * 100_000 + "]" * 100_000, "the run input")


def test_data_too_deep_to_publish_is_a_cli_error_not_a_crash() -> None:
    event = CloudEvent(id="1", source="/cli", type="t", data=parse_json("[" * 70 + "]" * 70, "x"))
    with pytest.raises(CliError, match="cannot send this data"):
        nats_ops._encode(event)


@given(st.text(max_size=200))
def test_any_text_is_either_json_that_can_be_sent_or_a_cli_error(text: str) -> None:
    try:
        value = parse_json(text, "the run input")
    except CliError:
        return
    event = CloudEvent(id="1", source="/cli", type="troupe.cli.message", data=value)
    try:
        envelope.to_binary(event)
    except envelope.UnpublishableEvent:
        pytest.fail(f"parse_json accepted {text!r}, which cannot be published")
