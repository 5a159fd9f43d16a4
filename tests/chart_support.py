"""What the chart tests share: ``helm`` (built by tools/build-controlplane.sh), rendering the
chart with given values, and picking objects out of the rendered documents."""

from __future__ import annotations

import functools
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from troupe_devcluster.__main__ import build_binaries
from troupe_operator.gen import bundle

REPOSITORY = Path(__file__).resolve().parents[1]
CHART = REPOSITORY / "charts" / "troupe"
DEPLOY = REPOSITORY / "deploy"
RELEASE = bundle.RELEASE
NAMESPACE = bundle.NAMESPACE
OPERATOR = f"{RELEASE}-operator"
GATEWAY = f"{RELEASE}-gateway"

GATEWAY_ON: dict[str, Any] = {"gateway": {"enabled": True}}
# Every optional feature on, NATS credentials from a Secret, and a list of watched namespaces.
ALL_OPTIONS: dict[str, Any] = {
    **GATEWAY_ON,
    "nats": {"credentialsSecret": "troupe-nats-creds", "install": {"enabled": True}},
    "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
    "grafanaDashboard": {"enabled": True},
}


def kube_version() -> str:
    """The Kubernetes version the chart is rendered for: the local control plane's."""
    for line in (REPOSITORY / "tools" / "versions.env").read_text().splitlines():
        if line.startswith("K8S_VERSION="):
            return line.split("=", 1)[1].strip().removeprefix("v")
    raise ValueError("tools/versions.env names no K8S_VERSION")


@functools.cache
def helm() -> Path:
    return build_binaries() / "helm"


def run_helm(*args: str) -> str:
    result = subprocess.run(
        [str(helm()), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    return result.stdout


def render_text(
    values: dict[str, Any] | None = None, namespace: str = NAMESPACE, *extra: str
) -> str:
    """``helm template`` of the chart as release ``troupe`` in ``namespace``."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        json.dump(values or {}, file)
        file.flush()
        return run_helm(
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            namespace,
            "--kube-version",
            kube_version(),
            "--values",
            file.name,
            *extra,
        )


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render(
    values: dict[str, Any] | None = None, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    return documents(render_text(values, namespace))


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}
