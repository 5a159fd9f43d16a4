"""A handler's ``ctx.attributes`` as CloudEvent extension attributes of what it publishes."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from troupe_runtime.agent.outputs import valid_extensions
from troupe_runtime.contract import envelope
from troupe_runtime.contract.envelope import CloudEvent, UnpublishableEvent
from troupe_runtime.contract.usage import Usage

CAUSE = CloudEvent(id="in-1", source="/tests", type="test.input", data={"q": 1})


def follow_up(extensions: dict[str, Any]) -> CloudEvent:
    return CAUSE.follow_up(
        source="/ns/a",
        type="test.input.output",
        data={"a": 1},
        index=0,
        scope="ns/a",
        extensions=extensions,
    )


def test_usage_attributes_become_ce_headers() -> None:
    usage = Usage(tokens_in=120, tokens_out=7, cost_usd=0.00042)
    headers, _ = envelope.to_binary(follow_up(valid_extensions(usage.attributes())))
    assert headers["ce-troupetokensin"] == "120"
    assert headers["ce-troupetokensout"] == "7"
    assert headers["ce-troupecostusd"] == "0.000420000"


def test_a_boolean_extension_is_published_as_true_or_false() -> None:
    headers, _ = envelope.to_binary(follow_up(valid_extensions({"cached": True})))
    assert headers["ce-cached"] == "true"


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("Tokens", 1, "lower-case"),
        ("tokens_in", 1, "lower-case"),
        ("averyveryverylongname1", 1, "longer than 20"),
        ("id", "forged", "the runtime sets itself"),
        ("replyto", "troupe.x", "the runtime sets itself"),
        ("data", 1, "the runtime sets itself"),
        ("cost", 0.5, "a float"),
        ("big", 2**31, "32-bit"),
        ("nested", {"a": 1}, "a dict"),
        ("text", "a\nb", "control characters"),
        ("text", "x" * 1025, "longer than 1024 bytes"),
        (3, 1, "lower-case"),
    ],
)
def test_an_invalid_attribute_is_logged_and_dropped(
    name: Any, value: Any, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        kept = valid_extensions({name: value, "ok": 1})
    assert kept == {"ok": 1}
    assert why in caplog.text


def test_a_dropped_attribute_is_reported_once_per_message(caplog: pytest.LogCaptureFixture) -> None:
    reported: set[str] = set()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            valid_extensions({"Bad": 1}, reported)
    assert caplog.text.count("'Bad'") == 1


def test_the_envelope_itself_refuses_an_invalid_extension() -> None:
    with pytest.raises(UnpublishableEvent, match="the runtime sets itself"):
        follow_up({"type": "forged"})


names = st.one_of(st.text(max_size=25), st.from_regex(r"[a-z0-9]{1,22}", fullmatch=True))
values = st.one_of(
    st.text(max_size=40),
    st.integers(),
    st.booleans(),
    st.floats(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


@given(st.dictionaries(names, values, max_size=6))
def test_whatever_a_handler_sets_what_is_kept_publishes_and_reads_back(
    attributes: dict[Any, Any],
) -> None:
    kept = valid_extensions(attributes)
    assert kept.keys() <= attributes.keys()
    headers, payload = envelope.to_binary(follow_up(kept))
    parsed = envelope.parse(headers, payload)
    for name, value in kept.items():
        expected = ("true" if value else "false") if isinstance(value, bool) else str(value)
        assert str((parsed.model_extra or {})[name]) == expected
