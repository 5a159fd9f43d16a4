"""kopf's copy of the last handled spec keeps schemas as digests (an annotation holds
256 KiB at most), and still tells a changed spec from an unchanged one."""

from __future__ import annotations

import json
from typing import Any

import kopf
from hypothesis import given, settings
from hypothesis import strategies as st

from troupe_operator.diffbase import DigestedDiffBaseStorage

ANNOTATIONS_LIMIT = 256 * 1024
STORAGE = DigestedDiffBaseStorage(prefix="troupe.dev")


def _body(spec: dict[str, Any]) -> kopf.Body:
    raw = {
        "apiVersion": "troupe.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": "a", "namespace": "n", "annotations": {}},
        "spec": spec,
    }
    return kopf.Body(raw)  # type: ignore[arg-type]


def _stored(spec: dict[str, Any]) -> str:
    patch = kopf.Patch()
    body = _body(spec)
    STORAGE.store(body=body, patch=patch, essence=STORAGE.build(body=body))
    annotations = patch["metadata"]["annotations"]
    assert sum(len(key) + len(value) for key, value in annotations.items()) < ANNOTATIONS_LIMIT
    return str(annotations["troupe.dev/last-handled-configuration"])


def test_a_megabyte_schema_is_stored_as_a_digest_far_below_the_annotation_limit() -> None:
    schema = {"type": "object", "description": "x" * (1024 * 1024)}

    stored = _stored({"role": "r", "contract": {"inputSchema": schema, "outputSchema": schema}})

    assert len(stored) < 1024
    contract = json.loads(stored)["spec"]["contract"]
    assert contract["inputSchema"].startswith("sha256:")
    assert contract["inputSchema"] == contract["outputSchema"]


def test_what_is_not_a_schema_is_kept_as_it_is() -> None:
    spec = {"role": "r", "contract": {"outputSubjects": ["out.x"]}, "timeout": "5s"}

    assert json.loads(_stored(spec))["spec"] == spec


_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=4)),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children)
    ),
    max_leaves=6,
)


@settings(max_examples=100, deadline=None)
@given(_JSON, _JSON)
def test_two_specs_have_one_essence_exactly_when_their_schemas_are_equal(a: Any, b: Any) -> None:
    def essence(schema: Any) -> Any:
        return STORAGE.build(body=_body({"role": "r", "contract": {"inputSchema": schema}}))

    def same(x: Any, y: Any) -> bool:
        # As JSON, not Python: False == 0 in Python, but the specs differ.
        return json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)

    assert (essence(a) == essence(b)) == same(a, b)
