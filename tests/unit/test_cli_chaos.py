"""troupe chaos run, ls and show without a cluster: the manifest the flags or a file make,
what is refused before anything is sent, and what is printed whatever an experiment holds."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from troupe_cli import chaos
from troupe_cli.errors import Refused
from troupe_cli.main import build_parser

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _args(*argv: str) -> Any:
    return build_parser().parse_args(["chaos", "run", "-n", "team", *argv])


def test_flags_make_a_chaos_experiment_with_the_runtime_faults() -> None:
    manifest = chaos.manifest_from_flags(
        _args(
            "--selector",
            "app=support,tier=front",
            "--duration",
            "90s",
            "--handler-errors",
            "0.5",
            "--model-latency",
            "200ms",
            "--duplicates",
            "0.1",
            "--drop-every",
            "20s",
            "--pod-kills-every",
            "1m",
        )
    )
    assert manifest["apiVersion"] == "troupe.dev/v1alpha1"
    assert manifest["kind"] == "ChaosExperiment"
    assert manifest["metadata"] == {"namespace": "team", "generateName": "chaos-"}
    assert manifest["spec"] == {
        "selector": {"agents": {"matchLabels": {"app": "support", "tier": "front"}}},
        "duration": "90s",
        "faults": {
            "handler": {"errorRatio": 0.5},
            "model": {"latency": "200ms"},
            "messages": {"duplicateRatio": 0.1},
            "connection": {"dropEvery": "20s"},
            "podKills": {"every": "1m"},
        },
    }


def test_an_empty_selector_selects_every_agent_and_a_name_is_kept() -> None:
    manifest = chaos.manifest_from_flags(
        _args("--name", "storm", "--selector", "", "--duration", "30s", "--tool-errors", "1")
    )
    assert manifest["metadata"] == {"namespace": "team", "name": "storm"}
    assert manifest["spec"]["selector"] == {"agents": {}}


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--duration", "30s", "--tool-errors", "1"], "--selector and --duration"),
        (["--selector", "app", "--duration", "30s", "--tool-errors", "1"], "key=value"),
        (["--selector", "a=b", "--duration", "soon", "--tool-errors", "1"], "--duration"),
        (["--selector", "a=b", "--duration", "30s"], "no fault asked for"),
        (["--selector", "a=b", "--duration", "30s", "--handler-latency", "1h"], "at most 10m"),
    ],
)
def test_bad_flags_are_refused_before_anything_is_sent(argv: list[str], said: str) -> None:
    with pytest.raises(Refused, match=said):
        chaos.manifest_from_flags(_args(*argv))


def test_a_ratio_outside_zero_to_one_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        _args("--selector", "a=b", "--duration", "30s", "--handler-errors", "1.5")


def test_a_file_is_taken_as_one_chaos_experiment_in_the_namespace_asked() -> None:
    text = """
kind: ChaosExperiment
apiVersion: troupe.dev/v1alpha1
metadata: {name: storm}
spec:
  selector: {agents: {}}
  duration: 30s
  faults: {handler: {errorRatio: 1}}
"""
    manifest = chaos.manifest_from_text(text, "team")
    assert manifest["metadata"] == {"name": "storm", "namespace": "team"}
    assert manifest["spec"]["faults"] == {"handler": {"errorRatio": 1}}


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("- a\n- b\n", "a mapping"),
        ("kind: Agent\napiVersion: troupe.dev/v1alpha1\nspec: {}\n", "must be a ChaosExperiment"),
        ("kind: ChaosExperiment\n", "metadata and spec"),
        ("{unclosed", "not YAML"),
    ],
)
def test_a_file_that_is_not_a_chaos_experiment_is_refused(text: str, said: str) -> None:
    with pytest.raises(Refused, match=said):
        chaos.manifest_from_text(text, "team")


@given(st.text(max_size=300))
def test_any_file_text_is_a_manifest_or_a_refusal(text: str) -> None:
    try:
        manifest = chaos.manifest_from_text(text, "team")
    except Refused:
        return
    assert manifest["kind"] == "ChaosExperiment"
    assert manifest["metadata"]["namespace"]


def test_ages_read_as_kubectl_writes_them() -> None:
    assert chaos.age("2026-12-03T11:59:15Z", NOW) == "45s"
    assert chaos.age("2026-12-03T11:48:00Z", NOW) == "12m"
    assert chaos.age("2026-12-03T09:00:00Z", NOW) == "3h"
    assert chaos.age("2026-11-25T12:00:00Z", NOW) == "8d"
    assert chaos.age(None, NOW) == "?"


def _experiment(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "storm",
            "namespace": "team",
            "creationTimestamp": "2026-12-03T11:50:00Z",
        },
        "spec": {
            "selector": {"agents": {"matchLabels": {"app": "support"}}},
            "duration": "30s",
            "faults": {
                "handler": {"errorRatio": 0.25, "latency": "200ms"},
                "messages": {"duplicateRatio": 0.1},
                "connection": {"dropEvery": "20s"},
            },
            "steadyState": {"minSuccessRatio": 0.9, "maxDeadLetters": 3},
        },
        "status": status,
    }


def test_ls_shows_name_phase_verdict_runs_and_age() -> None:
    text = chaos.experiments_text([_experiment(phase="Failed", verdict="Failed", runs=1)], NOW)
    header, row = text.splitlines()
    assert header.split() == ["NAME", "PHASE", "VERDICT", "RUNS", "AGE"]
    assert row.split() == ["storm", "Failed", "Failed", "1", "10m"]
    assert chaos.experiments_text([], NOW) == "no ChaosExperiments"


def test_show_gives_the_spec_the_figures_and_the_verdict() -> None:
    item = _experiment(
        phase="Failed",
        run="r-1",
        verdict="Failed",
        verdictReason="success ratio 80% is below 90%",
        targets={"agents": ["triage"]},
        figures={
            "probesSent": 10,
            "probesAnswered": 8,
            "probesFailed": 2,
            "successRatio": 0.8,
            "p95Latency": "350ms",
            "deadLettersBefore": 1,
            "deadLettersAfter": 3,
        },
    )
    text = chaos.experiment_text(item, NOW)
    assert "ChaosExperiment team/storm (age 10m)" in text
    assert "targets: agents app=support" in text
    assert "handler: +200ms, 25% errors" in text
    assert "messages: 10% duplicated" in text
    assert "connection: dropped every 20s" in text
    assert "steady state: success ratio >= 90%, dead letters +3 at most" in text
    assert "phase: Failed (run r-1)" in text
    assert "targeted: triage" in text
    assert "probes: 10 sent, 8 answered, 2 failed, 0 lost, 0 pending" in text
    assert "success ratio: 80%" in text
    assert "dead letters: 1 -> 3 (+2)" in text
    assert "verdict: Failed: success ratio 80% is below 90%" in text


def test_show_of_an_experiment_not_yet_run_says_pending() -> None:
    text = chaos.experiment_text(_experiment(), NOW)
    assert "phase: Pending" in text
    assert "verdict: -" in text


JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(spec=JUNK, status=JUNK)
def test_show_and_ls_never_crash_whatever_the_object_holds(spec: Any, status: Any) -> None:
    item = {"metadata": {"name": "x", "namespace": "y"}, "spec": spec, "status": status}
    assert isinstance(chaos.experiment_text(item, NOW), str)
    assert isinstance(chaos.experiments_text([item], NOW), str)
