"""``troupe chaos run``, ``ls`` and ``show`` against the real API server: the experiment
created is the object the API server stores, and what ``ls`` and ``show`` print is its
status as the operator writes it (patched here, as no operator runs in this module).

The CRD is the one that ships (``crds/chaosexperiments.troupe.dev.yaml``), installed with
the others, so what the CLI creates passes its schema and CEL rules.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.integration.operator_support import install_crds
from troupe_cli.main import amain
from troupe_devcluster.fixtures import ClusterEndpoints, create_namespace
from troupe_devcluster.kube import core_v1

GROUP, VERSION, PLURAL = "troupe.dev", "v1alpha1", "chaosexperiments"
CRD = "chaosexperiments.troupe.dev"
Output = tuple[int, str, str]


@pytest.fixture(scope="module")
def crd(cluster: ClusterEndpoints) -> None:
    install_crds(cluster)
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD}", "--timeout=30s")


@pytest.fixture
def team(api_client: Any, crd: None) -> Iterator[str]:
    name = create_namespace(api_client, {"troupe.dev/chaos": "enabled"})
    yield name
    core_v1(api_client).delete_namespace(name)


async def troupe(
    capsys: pytest.CaptureFixture[str], kubeconfig: Path, namespace: str, *args: str
) -> Output:
    code = await amain(["chaos", *args, "-n", namespace, "--kubeconfig", str(kubeconfig)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def stored(api_client: Any, namespace: str, name: str) -> dict[str, Any]:
    custom = client.CustomObjectsApi(api_client)
    item = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    assert isinstance(item, dict)
    return item


async def test_run_with_flags_creates_the_experiment_the_flags_describe(
    capsys: pytest.CaptureFixture[str], kubeconfig: Path, api_client: Any, team: str
) -> None:
    code, out, err = await troupe(
        capsys,
        kubeconfig,
        team,
        "run",
        "--name",
        "storm",
        "--selector",
        "app=support",
        "--duration",
        "30s",
        "--handler-errors",
        "0.5",
        "--message-delay",
        "100ms",
    )
    assert (code, err) == (0, "")
    assert f"created ChaosExperiment {team}/storm" in out
    spec = stored(api_client, team, "storm")["spec"]
    assert spec["selector"] == {"agents": {"matchLabels": {"app": "support"}}}
    assert spec["duration"] == "30s"
    assert spec["faults"]["handler"]["errorRatio"] == 0.5
    assert spec["faults"]["messages"]["delay"] == "100ms"


async def test_run_from_a_file_creates_it_under_a_generated_name(
    capsys: pytest.CaptureFixture[str],
    kubeconfig: Path,
    api_client: Any,
    team: str,
    tmp_path: Path,
) -> None:
    manifest = tmp_path / "experiment.yaml"
    manifest.write_text(
        "apiVersion: troupe.dev/v1alpha1\nkind: ChaosExperiment\nmetadata: {}\n"
        "spec:\n  selector: {agents: {}}\n  duration: 20s\n"
        "  faults: {connection: {dropEvery: 5s}}\n"
    )
    code, out, _ = await troupe(capsys, kubeconfig, team, "run", "-f", str(manifest), "-o", "json")
    assert code == 0
    created = yaml.safe_load(out)
    name = created["metadata"]["name"]
    assert name.startswith("chaos-")
    assert stored(api_client, team, name)["spec"]["faults"] == {"connection": {"dropEvery": "5s"}}


async def test_ls_and_show_print_the_status_the_operator_writes(
    capsys: pytest.CaptureFixture[str], kubeconfig: Path, api_client: Any, team: str
) -> None:
    await troupe(
        capsys, kubeconfig, team, "run", "--name", "drill", "--selector", "", "--duration",
        "10s", "--tool-errors", "1",
    )  # fmt: skip
    code, out, _ = await troupe(capsys, kubeconfig, team, "ls")
    assert code == 0
    assert out.splitlines()[1].split()[:4] == ["drill", "Pending", "-", "0"]

    status = {
        "phase": "Failed",
        "run": "r-1",
        "verdict": "Failed",
        "verdictReason": "success ratio 50% is below 100%",
        "runs": 1,
        "targets": {"agents": ["triage"]},
        "figures": {"probesSent": 4, "probesAnswered": 2, "probesFailed": 2, "successRatio": 0.5},
    }
    client.CustomObjectsApi(api_client).patch_namespaced_custom_object_status(
        GROUP, VERSION, team, PLURAL, "drill", {"status": status}
    )
    code, out, _ = await troupe(capsys, kubeconfig, team, "ls")
    assert out.splitlines()[1].split()[:4] == ["drill", "Failed", "Failed", "1"]
    code, out, _ = await troupe(capsys, kubeconfig, team, "show", "drill")
    assert code == 0
    assert "tools: 100% errors" in out
    assert "targeted: triage" in out
    assert "probes: 4 sent, 2 answered, 2 failed" in out
    assert "verdict: Failed: success ratio 50% is below 100%" in out


async def test_show_of_a_missing_experiment_says_how_to_list_them(
    capsys: pytest.CaptureFixture[str], kubeconfig: Path, team: str
) -> None:
    code, _, err = await troupe(capsys, kubeconfig, team, "show", "nothing")
    assert code == 1
    assert "no ChaosExperiment nothing" in err
    assert "troupe chaos ls" in err


async def test_an_experiment_the_api_server_refuses_is_printed_with_its_reason(
    capsys: pytest.CaptureFixture[str], kubeconfig: Path, api_client: Any, team: str
) -> None:
    code, _, err = await troupe(
        capsys, kubeconfig, team, "run", "--name", "forever", "--selector", "", "--duration",
        "48h", "--handler-errors", "1",
    )  # fmt: skip
    assert code == 2
    assert "24h" in err
    custom = client.CustomObjectsApi(api_client)
    listed: Any = custom.list_namespaced_custom_object(GROUP, VERSION, team, PLURAL)
    assert listed["items"] == []
