"""The Argo CD health check that ships in charts/troupe/argocd, run by a real Lua 5.1 in
Argo CD's sandbox against hand-written Agents and Workflows: each status gives the health the
status vocabulary promises, any status at all gives exactly one health and never a script
error, it agrees with kstatus on every status the operator writes, and the snippets people
paste into Argo CD carry the script verbatim."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lupa.lua51  # type: ignore[import-untyped]
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.health_support import ARGOCD, HEALTH_LUA, argocd_health, kstatus

KINDS = ("Agent", "Workflow", "ModelProvider", "Budget", "ChaosExperiment")
KEYS = {f"resource.customizations.health.troupe.dev_{kind}" for kind in KINDS}
INT64 = st.integers(-(2**63), 2**63 - 1)
HEALTH_OF_KSTATUS = {"Current": "Healthy", "InProgress": "Progressing", "Failed": "Degraded"}


def _condition(kind: str, status: str, reason: str = "Why", message: str = "") -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }


def _object(status: Any = None, generation: int | None = 2, kind: str = "Agent") -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "writer", "namespace": "team"}
    if generation is not None:
        metadata["generation"] = generation
    body: dict[str, Any] = {"apiVersion": "troupe.dev/v1alpha1", "kind": kind, "metadata": metadata}
    if status is not None:
        body["status"] = status
    return body


def _status(*conditions: dict[str, Any], observed: int = 2) -> dict[str, Any]:
    return {"observedGeneration": observed, "conditions": list(conditions)}


READY = _condition("Ready", "True", "Ready", "2/2 replicas ready")
RECONCILING = _condition("Reconciling", "True", "ReplicasNotReady", "0/2 replicas ready")
STALLED = _condition("Stalled", "True", "CycleDetected", "steps form a cycle: a -> b -> a")
NOT_READY = _condition("Ready", "False", "ReplicasNotReady", "0/2 replicas ready")
NOT_RECONCILING = _condition("Reconciling", "False", "Ready")
NOT_STALLED = _condition("Stalled", "False", "Ready")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("body", "health", "message"),
    [
        (_object(), "Progressing", "Waiting for the Troupe operator to report a status"),
        (_object({}), "Progressing", "Waiting for the Troupe operator to observe generation 2"),
        (
            _object(_status(READY, NOT_RECONCILING, NOT_STALLED, observed=1)),
            "Progressing",
            "Waiting for the Troupe operator to observe generation 2",
        ),
        (_object(_status(READY, NOT_RECONCILING, NOT_STALLED)), "Healthy", "2/2 replicas ready"),
        (_object(_status(READY), generation=None), "Healthy", "2/2 replicas ready"),
        (_object(_status(_condition("Ready", "True"))), "Healthy", "Ready"),
        (
            _object(_status(NOT_READY, RECONCILING, NOT_STALLED)),
            "Progressing",
            "0/2 replicas ready",
        ),
        (_object(_status(NOT_READY)), "Progressing", "0/2 replicas ready"),
        (_object(_status(_condition("Ready", "Unknown", "Pending"))), "Progressing", "Pending"),
        (
            _object(_status(_condition("Ready", "False", "CycleDetected"), STALLED)),
            "Degraded",
            "steps form a cycle: a -> b -> a",
        ),
        (_object(_status(READY, STALLED)), "Degraded", "steps form a cycle: a -> b -> a"),
        (
            _object(_status(_condition("Stalled", "True", "AgentNotFound"))),
            "Degraded",
            "AgentNotFound",
        ),
        (_object(_status()), "Progressing", "Waiting for the Ready condition"),
    ],
    ids=[
        "no status",
        "empty status",
        "generation not yet observed",
        "ready",
        "ready, no generation",
        "ready without message",
        "reconciling",
        "not ready, before Stalled existed",
        "ready unknown",
        "stalled",
        "stalled beats ready",
        "stalled without message",
        "no conditions",
    ],
)
def test_each_status_gives_the_health_the_vocabulary_promises(
    kind: str, body: dict[str, Any], health: str, message: str
) -> None:
    body = {**body, "kind": kind}
    assert argocd_health(body) == (health, message)


def test_the_sandbox_has_no_string_library_as_in_argo_cd(tmp_path: Path) -> None:
    script = tmp_path / "health.lua"
    script.write_text('return {status = "Healthy", message = string.format("%d", 1)}\n')
    with pytest.raises(lupa.lua51.LuaError, match="string"):
        argocd_health(_object(), script)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | INT64
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
CONDITION = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["Ready", "Reconciling", "Stalled", "SpecValid"]) | JSON,
        "status": st.sampled_from(["True", "False", "Unknown"]) | JSON,
        "reason": st.text(max_size=10) | JSON,
        "message": st.text(max_size=20) | JSON,
    },
)
STATUS = JSON | st.fixed_dictionaries(
    {},
    optional={
        "observedGeneration": INT64 | JSON,
        "conditions": st.lists(CONDITION | JSON, max_size=5) | JSON,
    },
)
METADATA = JSON | st.fixed_dictionaries({}, optional={"generation": INT64 | JSON})


@given(metadata=METADATA, status=STATUS)
def test_any_status_gives_exactly_one_health_and_never_a_script_error(
    metadata: Any, status: Any
) -> None:
    body = {"apiVersion": "troupe.dev/v1alpha1", "kind": "Agent", "metadata": metadata}
    if status is not None:
        body["status"] = status
    health = argocd_health(body)
    assert health.status in {"Healthy", "Progressing", "Degraded"}
    assert isinstance(health.message, str)
    assert health.message


REASON = st.from_regex(r"\A[A-Z][A-Za-z]{0,15}\Z")
MESSAGE = st.text(min_size=1, max_size=30)


@st.composite
def operator_statuses(draw: st.DrawFn) -> dict[str, Any]:
    """A status as the operator writes it: all three top conditions, in one of the three
    states, observed at or behind the object's generation."""
    generation = draw(st.integers(1, 10**6))
    observed = draw(st.integers(0, generation))
    state = draw(st.sampled_from(["ready", "reconciling", "stalled"]))
    reason, message = draw(REASON), draw(MESSAGE)
    ready = _condition("Ready", "True" if state == "ready" else "False", reason, message)
    reconciling = _condition("Reconciling", "True" if state == "reconciling" else "False", reason)
    stalled = _condition("Stalled", "True" if state == "stalled" else "False", reason)
    for condition in (reconciling, stalled):
        if condition["status"] == "True":
            condition["message"] = message
    kind = draw(st.sampled_from(KINDS))
    return _object(_status(ready, reconciling, stalled, observed=observed), generation, kind)


@settings(deadline=None, max_examples=60)
@given(operator_statuses())
def test_argo_cd_and_kstatus_agree_on_every_status_the_operator_writes(
    body: dict[str, Any],
) -> None:
    verdict = kstatus(body)
    health = argocd_health(body)
    assert health.status == HEALTH_OF_KSTATUS[verdict.status]
    if verdict.status == "Failed":
        assert health.message == verdict.message


@pytest.mark.parametrize(
    ("snippet", "path"),
    [
        ("argocd-cm.yaml", ("data",)),
        ("argo-cd-values.yaml", ("configs", "cm")),
    ],
)
def test_the_snippets_embed_the_health_check_verbatim_for_both_kinds(
    snippet: str, path: tuple[str, ...]
) -> None:
    entries: Any = yaml.safe_load((ARGOCD / snippet).read_text())
    for key in path:
        entries = entries[key]
    assert set(entries) == KEYS
    script = HEALTH_LUA.read_text()
    for key, embedded in entries.items():
        assert embedded == script, f"{snippet}: {key} differs from health.lua; paste it again"
