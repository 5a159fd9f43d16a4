"""A2A message parts to a target's input: a data part as is, text as a string or as JSON
when the schema wants no string, file parts refused."""

from __future__ import annotations

import pytest
from a2a.helpers.proto_helpers import new_data_part, new_text_part
from a2a.types.a2a_pb2 import Message, Part, Role
from a2a.utils.errors import ContentTypeNotSupportedError, InvalidParamsError
from hypothesis import given
from hypothesis import strategies as st
from troupe_gateway import a2a_tasks

OBJECT = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}


def _message(*parts: Part) -> Message:
    return Message(message_id="m1", role=Role.ROLE_USER, parts=list(parts))


def test_a_data_part_is_the_input_with_whole_numbers_as_integers() -> None:
    got = a2a_tasks.message_input(_message(new_data_part({"n": 3, "x": 1.5})), OBJECT)
    assert got == {"n": 3, "x": 1.5}
    assert isinstance(got["n"], int)


def test_text_is_a_string_without_a_schema() -> None:
    assert a2a_tasks.message_input(_message(new_text_part('{"a": 1}')), None) == '{"a": 1}'


def test_text_is_parsed_as_json_when_the_schema_wants_an_object() -> None:
    assert a2a_tasks.message_input(_message(new_text_part('{"text": "x"}')), OBJECT) == {
        "text": "x"
    }


def test_plain_text_fills_the_one_string_property() -> None:
    assert a2a_tasks.message_input(_message(new_text_part("hello")), OBJECT) == {"text": "hello"}


def test_text_that_is_no_json_for_an_array_schema_is_refused() -> None:
    with pytest.raises(InvalidParamsError):
        a2a_tasks.message_input(_message(new_text_part("hello")), {"type": "array"})


def test_two_data_parts_and_file_parts_are_refused() -> None:
    with pytest.raises(InvalidParamsError):
        a2a_tasks.message_input(_message(new_data_part(1), new_data_part(2)), None)
    with pytest.raises(ContentTypeNotSupportedError):
        a2a_tasks.message_input(_message(Part(url="https://x.example/f")), None)


@given(st.text(), st.sampled_from([None, OBJECT, {"type": "array"}, {"type": "integer"}]))
def test_any_text_gives_an_input_or_a_clear_refusal(
    text: str, schema: dict[str, object] | None
) -> None:
    refusal = None
    try:
        a2a_tasks.message_input(_message(new_text_part(text)), schema)
    except InvalidParamsError as error:
        refusal = error
    assert refusal is None or "send a data part" in refusal.message
