"""A tool approval on a destructive MCP tool with nothing stood in: an LLM agent run by the
operator on the process node, a real MCP server (the mcp SDK) whose ``erase`` carries
``destructiveHint``, the scripted model asking for it, the operator mirroring the request as
an Approval owned by the Agent, ``troupe approve`` as a named ServiceAccount, the operator
relaying the decision to the Agent's approvals subject, the tool running once, the answer
reaching ``troupe send``, and the Approval's status Approved from the runtime's final word."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.integration.approval_support import may_decide, person
from tests.integration.operator_support import OperatorProcess, apply, condition, explained
from tests.integration.test_llm_agents_e2e import (
    finished,
    install_llm_crds,
    llm_agent,
    model_provider,
    send_streaming,
)
from tests.support.mcp_servers import McpTestServer, mcp_server
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_devcluster.scripted_llm import ScriptedLlm, ScriptedToolCall, Text, ToolCalls

__all__ = ["mcp_server"]

DEADLINE = 90.0


def _approvals(cluster: ClusterEndpoints, namespace: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(
        cluster.kubectl("get", "-n", namespace, "approvals", "-o", "json")
    )["items"]
    return found


def test_a_destructive_mcp_call_waits_for_troupe_approve_then_runs_once(
    cluster: ClusterEndpoints,
    namespace: str,
    operator: OperatorProcess,
    scripted_llm: ScriptedLlm,
    mcp_server: McpTestServer,
    tmp_path: Path,
) -> None:
    install_llm_crds(cluster)
    bob = person(cluster, namespace, "bob", tmp_path)
    may_decide(cluster, namespace, "bob")
    scripted_llm.script(
        ToolCalls([ScriptedToolCall("erase", '{"path": "/scratch"}', id="call_erase")]),
        Text("Erased /scratch, as approved."),
    )
    model = scripted_llm.models[0]
    with explained(cluster, namespace, operator):
        apply(cluster, namespace, model_provider("scripted", scripted_llm.base_url, model))
        apply(
            cluster,
            namespace,
            llm_agent(
                "janitor",
                "scripted",
                model,
                llm={
                    "systemPrompt": {"text": "Clean up."},
                    "tools": {
                        "mcp": [
                            {
                                "name": "files",
                                "url": mcp_server.url,
                                "allow": ["erase", "peek"],
                                "timeout": "10s",
                            }
                        ]
                    },
                    "approvals": {
                        "default": {
                            "approval": "destructive",
                            "approvers": {"users": [bob.user]},
                            "message": "{agent} wants {tool} {arguments}",
                        }
                    },
                },
            ),
        )
        cluster.kubectl(
            "wait", "-n", namespace, "--for=condition=Ready", "agent/janitor", "--timeout=90s"
        )
        sending = send_streaming(cluster, namespace, "janitor", "tidy up", 150)
        try:
            [approval] = wait_for(lambda: _approvals(cluster, namespace), DEADLINE, "an Approval")
            name = approval["metadata"]["name"]
            assert approval["metadata"]["ownerReferences"][0]["kind"] == "Agent"
            assert approval["spec"]["requester"]["tool"] == "erase"
            assert approval["spec"]["message"] == 'janitor wants erase {"path": "/scratch"}'
            assert mcp_server.calls("erase") == [], "the destructive tool ran before approval"

            approved = subprocess.run(
                [
                    sys.executable, "-m", "troupe_cli", "approve", name, "-n", namespace,
                    "--reason", "scratch is disposable", "--kubeconfig", str(bob.kubeconfig),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "KUBECONFIG": ""},
            )  # fmt: skip
            assert approved.returncode == 0, approved.stderr
            lines = finished(sending, 180)
        finally:
            if sending.poll() is None:
                sending.kill()

        def resolved() -> dict[str, Any] | None:
            found = [a for a in _approvals(cluster, namespace) if a["metadata"]["name"] == name]
            ready = condition(found[0], "Ready") if found else None
            return found[0] if ready and ready["status"] == "True" else None

        final = wait_for(resolved, DEADLINE, "the Approval's status Approved")
    assert lines[-1]["reply"]["data"]["content"] == "Erased /scratch, as approved.", lines[-1]
    assert mcp_server.calls("erase") == ["/scratch"]
    assert final["status"]["phase"] == "Approved"
    assert final["status"]["decidedBy"] == bob.user
    assert final["status"]["reason"] == "scratch is disposable"
