"""JSON merge patch (RFC 7386) and the three-way merge of the merge conflict policy."""

from __future__ import annotations

from typing import Any

import pytest

from troupe_runtime.state.merge import apply_patch, diff, three_way_merge

RFC_7386_EXAMPLES = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "result"), RFC_7386_EXAMPLES)
def test_apply_patch_matches_the_rfc_7386_examples(target: Any, patch: Any, result: Any) -> None:
    assert apply_patch(target, patch) == result


@pytest.mark.parametrize(
    ("base", "ours"),
    [
        ({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 4}, "e": [5]}),
        ({"a": 1}, "scalar"),
        (None, {"a": 1}),
    ],
)
def test_the_diff_applied_to_the_base_gives_ours(base: Any, ours: Any) -> None:
    assert apply_patch(base, diff(base, ours)) == ours


def test_three_way_merge_keeps_their_edits_to_fields_we_did_not_touch() -> None:
    base = {"title": "draft", "owner": "ann", "tags": ["a"]}
    ours = {"title": "final", "owner": "ann", "tags": ["a"]}
    theirs = {"title": "draft", "owner": "bob"}

    assert three_way_merge(base, ours, theirs) == {"title": "final", "owner": "bob"}


def test_three_way_merge_lets_ours_win_on_a_field_both_changed() -> None:
    assert three_way_merge({"n": 1}, {"n": 2}, {"n": 3}) == {"n": 2}
