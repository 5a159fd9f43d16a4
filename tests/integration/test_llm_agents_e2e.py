"""LLM agents end to end on the local cluster, through the real operator.

An Agent with a system prompt, a ModelProvider and an MCP tool, applied with kubectl and
asked with ``troupe send --stream``: the real local model (the research team's model server,
run as a pod as ``make demo`` runs it) streams its answer and calls the research library's
real MCP tool.

The agent's pod killed mid-conversation, while an MCP tool call is running: the new process
resumes from the message's journal. It runs no completed tool call again, never re-runs the
interrupted one (not idempotent), and asks the model no answered turn again. The scripted
model answers, so the turns are exactly known; the MCP server is a real one (the mcp SDK).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.integration.operator_support import (
    API_VERSION,
    REPO,
    OperatorProcess,
    apply,
    explained,
    get,
    install_crds,
    wait_ready,
)
from tests.support.mcp_servers import McpTestServer, free_port, mcp_server
from troupe_devcluster.components import venv_bin
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_devcluster.scripted_llm import ScriptedLlm, ScriptedToolCall, Text, ToolCalls

__all__ = ["mcp_server"]

EXAMPLE = REPO / "examples" / "research-team"
LOCAL_MODEL = "smollm2-135m"
SERVERS_READY_SECONDS = 300.0
"""The model server loads 93 MB and the machine is shared: generous, never a sleep."""
ANSWER_SECONDS = 180.0
CRASH_ANSWER_SECONDS = 240.0


def example_server(manifest: str, port: int) -> dict[str, Any]:
    """The example's Deployment (``model-server.yaml`` or ``library.yaml``) on ``port``."""
    [deployment] = [
        doc
        for doc in yaml.safe_load_all((EXAMPLE / manifest).read_text())
        if doc["kind"] == "Deployment"
    ]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    default = container["ports"][0]["containerPort"]
    argv = [*container.get("command", []), *container.get("args", [])]
    moved = [arg.replace(f"--port={default}", f"--port={port}") for arg in argv]
    assert moved != argv, f"{manifest} has no --port={default} to move"
    container["command"], container["args"] = moved, []
    container["ports"][0]["containerPort"] = port
    container["readinessProbe"]["httpGet"]["port"] = port
    return dict(deployment)


def model_provider(name: str, base_url: str, model: str, **served: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelProvider",
        "metadata": {"name": name},
        "spec": {"baseUrl": base_url, "models": [{"name": model, **served}]},
    }


def llm_agent(name: str, provider: str, model: str, **spec: Any) -> dict[str, Any]:
    """An LLM agent on the process node, its tests' modules importable."""
    llm = spec.pop("llm")
    return {
        "apiVersion": API_VERSION,
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {
            "role": f"test agent {name}",
            "runtime": {
                "handler": {"type": "llm"},
                "env": [{"name": "PYTHONPATH", "value": str(REPO)}],
            },
            "llm": {"model": {"provider": provider, "model": model}, **llm},
            **spec,
        },
    }


def send_streaming(
    cluster: ClusterEndpoints, namespace: str, agent: str, data: Any, timeout: float
) -> subprocess.Popen[str]:
    """``troupe send AGENT --stream -o json``, running: one JSON line per chunk, then the reply."""
    return subprocess.Popen(
        [
            str(venv_bin() / "troupe"),
            "--nats-url",
            cluster.nats_url,
            "-n",
            namespace,
            "-o",
            "json",
            "send",
            agent,
            "--stream",
            "--timeout",
            f"{timeout:g}",
            "--data",
            json.dumps(data),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process: subprocess.Popen[str], timeout: float) -> list[dict[str, Any]]:
    """The JSON lines a finished ``send_streaming`` printed; fails with its stderr."""
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"troupe send exited {process.returncode}: {stderr}"
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def library_calls(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/calls", timeout=5) as response:
        calls: dict[str, int] = json.load(response)
        return calls


def agent_pod(cluster: ClusterEndpoints, namespace: str, agent: str) -> dict[str, Any]:
    pods = json.loads(
        cluster.kubectl(
            "get", "pods", "-n", namespace, "-l", f"troupe.dev/agent={agent}", "-o", "json"
        )
    )["items"]
    running = [pod for pod in pods if pod["status"].get("phase") == "Running"]
    assert len(running) == 1, f"expected one running pod of {agent}, found {len(running)}"
    return dict(running[0])


def kill_pod_processes(cluster: ClusterEndpoints, pod: dict[str, Any]) -> list[int]:
    """SIGKILL every process of ``pod`` on the process node (each runs in its pod dir), as a
    crashed node or an OOM kill would: no shutdown, no goodbye to NATS."""
    meta = pod["metadata"]
    pod_dir = cluster.kubeconfig.parent / "process-node" / "pods"
    pod_dir = pod_dir / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
    killed = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:
            continue
        if cwd == pod_dir or pod_dir in cwd.parents:
            os.kill(int(proc.name), signal.SIGKILL)
            killed.append(int(proc.name))
    assert killed, f"no process runs in {pod_dir}"
    return killed


def install_llm_crds(cluster: ClusterEndpoints) -> None:
    install_crds(cluster)
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/modelproviders.troupe.dev", "--timeout=30s"
    )


def restarts(pod: dict[str, Any]) -> int:
    return sum(status.get("restartCount", 0) for status in pod["status"]["containerStatuses"])


def test_an_llm_agent_streams_the_local_models_answer_and_calls_an_mcp_tool(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    install_llm_crds(cluster)
    model_port, library_port = free_port(), free_port()
    cluster.kubectl(
        "create",
        "configmap",
        "research-servers",
        "-n",
        namespace,
        f"--from-file={EXAMPLE / 'servers'}",
    )
    with explained(cluster, namespace, operator):
        apply(cluster, namespace, example_server("model-server.yaml", model_port))
        apply(cluster, namespace, example_server("library.yaml", library_port))
        cluster.kubectl(
            "rollout",
            "status",
            "-n",
            namespace,
            "deployment/model-server",
            "deployment/research-library",
            f"--timeout={SERVERS_READY_SECONDS:g}s",
        )
        base_url = f"http://127.0.0.1:{model_port}/v1"
        apply(
            cluster, namespace, model_provider("local", base_url, LOCAL_MODEL, contextWindow=2048)
        )
        wait_ready(cluster, namespace, "modelprovider", "local")
        librarian = llm_agent(
            "librarian",
            "local",
            LOCAL_MODEL,
            llm={
                "systemPrompt": {
                    "text": "You are a librarian. Look {{ input.topic }} up in "
                    "the library, then answer in one sentence."
                },
                "temperature": 0,
                "maxTokens": 48,
                "maxTurns": 2,
                "toolChoice": "required",
                "tools": {
                    "mcp": [
                        {
                            "name": "library",
                            "url": f"http://127.0.0.1:{library_port}/mcp",
                            "allow": ["lookup"],
                            "timeout": "10s",
                        }
                    ]
                },
            },
            timeout="60s",
        )
        apply(cluster, namespace, librarian)
        wait_ready(cluster, namespace, "agent", "librarian")

        lines = finished(
            send_streaming(cluster, namespace, "librarian", {"topic": "jetstream"}, ANSWER_SECONDS),
            ANSWER_SECONDS + 30,
        )
    deltas = [line["delta"] for line in lines if line.get("delta")]
    reply = lines[-1]["reply"]
    assert deltas, f"the stream printed no deltas: {lines}"
    assert not reply["failed"], reply
    assert reply["data"], reply
    assert reply["usage"]["tokensIn"] > 0, reply
    assert library_calls(library_port).get("lookup", 0) >= 1


def test_a_pod_killed_mid_conversation_repeats_no_tool_call_and_no_model_turn(
    cluster: ClusterEndpoints,
    namespace: str,
    operator: OperatorProcess,
    scripted_llm: ScriptedLlm,
    mcp_server: McpTestServer,
) -> None:
    install_llm_crds(cluster)
    # Turn 1 records (a completed call), turn 2 blocks in `slow` until the pod dies, turn 3
    # is the new process's, after it replayed the first two from the journal.
    scripted_llm.script(
        ToolCalls([ScriptedToolCall("record", '{"text": "first"}', id="call_record")]),
        ToolCalls([ScriptedToolCall("slow", '{"seconds": 120}', id="call_slow")]),
        Text("Recorded, and the slow call was interrupted."),
    )
    model = scripted_llm.models[0]
    with explained(cluster, namespace, operator):
        apply(cluster, namespace, model_provider("scripted", scripted_llm.base_url, model))
        wait_ready(cluster, namespace, "modelprovider", "scripted")
        apply(
            cluster,
            namespace,
            llm_agent(
                "survivor",
                "scripted",
                model,
                llm={
                    "systemPrompt": {"text": "Record, then wait."},
                    "maxTurns": 4,
                    "tools": {
                        "mcp": [
                            {
                                "name": "tests",
                                "url": mcp_server.url,
                                "allow": ["record", "slow"],
                                "timeout": "10s",
                            }
                        ]
                    },
                },
                timeout="12s",
                # A dead pod's message comes back after ackWait: keep it short.
                messaging={"ackWait": "32s"},
            ),
        )
        wait_ready(cluster, namespace, "agent", "survivor")
        pod = agent_pod(cluster, namespace, "survivor")

        sending = send_streaming(cluster, namespace, "survivor", "go", CRASH_ANSWER_SECONDS)
        wait_for(lambda: mcp_server.calls("slow"), 60, "the agent to start the slow call")
        kill_pod_processes(cluster, pod)
        lines = finished(sending, CRASH_ANSWER_SECONDS + 30)
        after = get(cluster, namespace, "pod", pod["metadata"]["name"])

    assert restarts(after) >= 1, "the agent's container was not restarted after the kill"
    assert not lines[-1]["reply"]["failed"], lines[-1]
    assert mcp_server.calls("record") == ["first"], "a completed tool call ran again"
    assert len(mcp_server.calls("slow")) == 1, "an interrupted non-idempotent call ran again"
    asked = scripted_llm.completions
    assert len(asked) == 3, f"answered turns were asked again: {len(asked)} model calls"
    # The third turn was asked with the first two answers and their tool results in it.
    roles = [message.get("role") for message in asked[2].messages]
    assert roles.count("assistant") == 2, roles
    assert roles.count("tool") == 2, roles
