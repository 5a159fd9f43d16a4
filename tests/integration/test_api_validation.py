"""The API server refuses, at apply time and naming the field, every class of manifest the
operator used to accept and then fail on; it and the models accept exactly the same values;
and ``kubectl`` explains the fields and shows the wide columns. Each case goes through the
real API server with the CRDs that ship."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from tests.integration.operator_support import agent, install_crds, workflow
from troupe_devcluster.fixtures import ClusterEndpoints
from troupe_operator.api import AgentSpec, WorkflowSpec
from troupe_operator.api.common import GROUP, VERSION
from troupe_runtime.contract import grammar
from troupe_runtime.contract.durations import (
    DURATION_MAX_LENGTH,
    DURATION_PATTERN,
    MAX_DURATION,
    MAX_DURATION_TEXT,
    format_duration,
)


@pytest.fixture(scope="module")
def crds(cluster: ClusterEndpoints) -> None:
    install_crds(cluster)


def _workflow(name: str = "pipeline", **spec: Any) -> dict[str, Any]:
    manifest = workflow(name, [{"name": "fetch", "agentRef": "fetcher"}])
    manifest["spec"].update(spec)
    return manifest


def _step(**step: Any) -> dict[str, Any]:
    return _workflow(steps=[{"name": "fetch", "agentRef": "fetcher", **step}])


def _runtime(**runtime: Any) -> dict[str, Any]:
    return agent("a", runtime=runtime)


def _outputs(*subjects: str, name: str = "a") -> dict[str, Any]:
    return agent(name, contract={"outputSubjects": list(subjects)})


def _trigger(subject: str) -> dict[str, Any]:
    return _workflow(trigger={"subject": subject})


TOO_LONG = format_duration(MAX_DURATION + MAX_DURATION)

LLM = {"model": {"provider": "p", "model": "m"}}
REFUSED = [
    # Durations: positive where zero makes no sense, within int64 nanoseconds, whole ms.
    pytest.param(agent("a", timeout="0s"), ["spec.timeout", "greater than 0"], id="zero-timeout"),
    pytest.param(
        agent("a", messaging={"ackWait": "0ms"}),
        ["spec.messaging.ackWait", "greater than 0"],
        id="zero-ack-wait",
    ),
    pytest.param(
        agent("a", deadLetter={"retention": TOO_LONG}),
        ["spec.deadLetter.retention", "at most 2562047h47m16.854s"],
        id="duration-beyond-int64-nanoseconds",
    ),
    pytest.param(
        agent("a", timeout="1.0001s"), ["spec.timeout", "should match"], id="sub-millisecond"
    ),
    pytest.param(
        agent("a", deadLetter={"retention": "0s"}),
        ["spec.deadLetter.retention", "greater than 0"],
        id="zero-retention",
    ),
    pytest.param(
        _step(timeout="0s"), ["spec.steps[0].timeout", "greater than 0"], id="zero-step-timeout"
    ),
    pytest.param(_workflow(deadline="0m"), ["spec.deadline", "greater than 0"], id="zero-deadline"),
    pytest.param(
        _workflow(retention={"maxAge": "0h"}),
        ["spec.retention.maxAge", "greater than 0"],
        id="zero-run-retention",
    ),
    # The timeout fits into ackWait.
    pytest.param(
        agent("a", timeout="60s", messaging={"ackWait": "30s"}),
        ["spec.timeout", "must fit into 70% of messaging.ackWait"],
        id="timeout-longer-than-ack-wait",
    ),
    pytest.param(
        agent("a", timeout="20s", messaging={"ackWait": "40s"}),
        ["spec.timeout", "must fit into 70% of messaging.ackWait"],
        id="timeout-without-room-to-settle",
    ),
    # Trigger subjects.
    pytest.param(
        _trigger("troupe.ns.agents.x.in.p0"),
        ["spec.trigger.subject", "may not lie under troupe."],
        id="trigger-under-troupe",
    ),
    pytest.param(_trigger("$JS.API.>"), ["spec.trigger.subject", "should match"], id="trigger-$"),
    pytest.param(_trigger(">"), ["spec.trigger.subject", "should match"], id="trigger-everything"),
    pytest.param(
        _trigger("orders..new"), ["spec.trigger.subject", "should match"], id="trigger-empty-token"
    ),
    pytest.param(
        _trigger("orders.>.new"), ["spec.trigger.subject", "should match"], id="trigger-inner->"
    ),
    # Output subjects.
    pytest.param(
        _outputs("results.*"),
        ["spec.contract.outputSubjects[0]", "should match"],
        id="output-wildcard",
    ),
    pytest.param(
        _outputs("ok", "two words"),
        ["spec.contract.outputSubjects[1]", "should match"],
        id="output-whitespace",
    ),
    pytest.param(
        _outputs("a..b"), ["spec.contract.outputSubjects[0]", "should match"], id="output-empty"
    ),
    pytest.param(
        _outputs("$JS.API.STREAM.DELETE.x"),
        ["spec.contract.outputSubjects[0]", "should match"],
        id="output-jetstream-api",
    ),
    pytest.param(
        _outputs("troupe.any.agents.looper.in.p0", name="looper"),
        ["spec.contract.outputSubjects", "may not be the agent's own inbox"],
        id="output-own-inbox",
    ),
    # Names.
    pytest.param(agent("a.b"), ["metadata.name", "should match"], id="agent-name-with-dot"),
    pytest.param(agent("a" * 64), ["metadata.name", "Too long"], id="agent-name-too-long"),
    pytest.param(
        agent("orders-engine"),
        ["metadata.name", "may not end in -engine"],
        id="agent-named-like-an-engine",
    ),
    pytest.param(_workflow("w.x"), ["metadata.name", "should match"], id="workflow-name-with-dot"),
    # Env.
    pytest.param(
        _runtime(env=[{"name": "A=B", "value": "1"}]),
        ["spec.runtime.env[0].name", "should match"],
        id="env-name-with-equals",
    ),
    pytest.param(
        _runtime(env=[{"name": "TROUPE_CONFIG_JSON", "value": "{}"}]),
        ["spec.runtime.env[0].name", "the operator sets this variable itself"],
        id="env-reserved-prefix",
    ),
    pytest.param(
        _runtime(env=[{"name": "POD_IP", "value": "1.2.3.4"}]),
        ["spec.runtime.env[0].name", "the operator sets this variable itself"],
        id="env-reserved-name",
    ),
    pytest.param(
        _runtime(code={"configMap": "c"}, env=[{"name": "PYTHONPATH", "value": "/x"}]),
        ["spec.runtime.env", "the operator sets PYTHONPATH itself"],
        id="env-pythonpath-with-code",
    ),
    pytest.param(
        _runtime(env=[{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
        ["spec.runtime.env[1]", "Duplicate value"],
        id="env-duplicate",
    ),
    pytest.param(
        _runtime(
            env=[{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "spec.x"}}}]
        ),
        ["spec.runtime.env[0].valueFrom", "either value or valueFrom"],
        id="env-value-and-value-from",
    ),
    # Sidecars.
    pytest.param(
        _runtime(sidecars=[{"image": "busybox"}]),
        ["spec.runtime.sidecars[0].name", "Required value"],
        id="sidecar-without-name",
    ),
    pytest.param(
        _runtime(sidecars=[{"name": "runtime", "image": "busybox"}]),
        ["spec.runtime.sidecars", "may not be named runtime"],
        id="sidecar-named-runtime",
    ),
    pytest.param(
        _runtime(sidecars=[{"name": "s", "image": "a"}, {"name": "s", "image": "b"}]),
        ["spec.runtime.sidecars", "sidecar names must be unique"],
        id="sidecar-duplicate",
    ),
    pytest.param(
        _runtime(sidecars=[{"name": "Side_Car", "image": "busybox"}]),
        ["spec.runtime.sidecars[0].name", "should match"],
        id="sidecar-name-not-a-dns-label",
    ),
    # Resources.
    pytest.param(
        _runtime(resources={"limits": {"memory": "1 Gi"}}),
        ["spec.runtime.resources.limits.memory", "should match"],
        id="quantity-invalid",
    ),
    pytest.param(
        _runtime(resources={"requests": {"cpu": -1}}),
        ["spec.runtime.resources.requests.cpu", "greater than or equal to 0"],
        id="quantity-negative",
    ),
    pytest.param(
        _runtime(resources={"limits": {"gpu": "1"}}),
        ["spec.runtime.resources.limits", "resource names are cpu, memory"],
        id="resource-name-unknown",
    ),
    pytest.param(
        _runtime(resources={"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}),
        ["spec.runtime.resources.requests", "a request may not exceed its limit"],
        id="request-above-limit",
    ),
    pytest.param(
        _runtime(resources={"requests": {"example.com/gpu": 1}}),
        ["spec.runtime.resources.requests", "cannot be overcommitted"],
        id="extended-resource-without-limit",
    ),
    pytest.param(
        _runtime(resources={"limits": {"example.com/gpu": "500m"}}),
        ["spec.runtime.resources.limits", "whole units"],
        id="extended-resource-fraction",
    ),
    # Node selectors and env sources.
    pytest.param(
        _runtime(nodeSelector={"bad key": "x"}),
        ["spec.runtime.nodeSelector", "qualified names"],
        id="node-selector-key",
    ),
    pytest.param(
        _runtime(nodeSelector={"pool": "not a value"}),
        ["spec.runtime.nodeSelector.pool", "should match"],
        id="node-selector-value",
    ),
    pytest.param(
        _runtime(envFrom=[{"configMapRef": {"name": "a"}, "secretRef": {"name": "b"}}]),
        ["spec.runtime.envFrom[0]", "exactly one of configMapRef and secretRef"],
        id="env-from-two-sources",
    ),
    pytest.param(
        _runtime(envFrom=[{"secretRef": {"name": "k"}, "prefix": "A="}]),
        ["spec.runtime.envFrom[0].prefix", "should match"],
        id="env-from-prefix-with-equals",
    ),
    pytest.param(
        _runtime(env=[{"name": "A", "valueFrom": {"secretKeyRef": {"name": "keys"}}}]),
        ["spec.runtime.env[0].valueFrom.secretKeyRef.key", "Required value"],
        id="value-from-without-key",
    ),
    pytest.param(
        _runtime(env=[{"name": "A", "valueFrom": {}}]),
        ["spec.runtime.env[0].valueFrom", "exactly one of fieldRef"],
        id="value-from-empty",
    ),
    # Tolerations, images, handlers, error states.
    pytest.param(
        _runtime(tolerations=[{"key": "k", "operator": "Exists", "value": "v"}]),
        ["spec.runtime.tolerations[0].value", "leave value unset"],
        id="toleration-exists-with-value",
    ),
    pytest.param(
        _runtime(tolerations=[{"operator": "Equal", "value": "v"}]),
        ["spec.runtime.tolerations[0].key", "must use operator Exists"],
        id="toleration-equal-without-key",
    ),
    pytest.param(
        _runtime(image="troupe/runtime: 0.1"),
        ["spec.runtime.image", "should match"],
        id="image-with-space",
    ),
    pytest.param(
        _runtime(handler={"type": "http", "url": "ftp://x/y"}),
        ["spec.runtime.handler.url", "should match"],
        id="http-url-not-http",
    ),
    pytest.param(
        _runtime(handler={"type": "llm"}),
        ["spec.runtime.handler", "an llm handler needs exactly one of"],
        id="llm-without-secret-or-llm",
    ),
    pytest.param(
        agent("a", runtime={"handler": {"type": "llm", "secretName": "s"}}, llm=LLM),
        ["spec.runtime.handler", "an llm handler needs exactly one of"],
        id="llm-with-secret-and-llm",
    ),
    pytest.param(
        agent("a", llm=LLM),
        ["spec.llm", "llm needs runtime.handler.type llm"],
        id="llm-without-llm-handler",
    ),
    pytest.param(
        agent(
            "a",
            runtime={"handler": {"type": "llm"}},
            llm={
                **LLM,
                "systemPrompt": {"text": "x", "configMapKeyRef": {"name": "p", "key": "k"}},
            },
        ),
        ["spec.llm.systemPrompt", "exactly one of text and configMapKeyRef"],
        id="llm-prompt-from-two-sources",
    ),
    pytest.param(
        agent(
            "a",
            runtime={"handler": {"type": "llm"}},
            llm={**LLM, "tools": {"mcp": [{"name": "t"}]}},
        ),
        ["spec.llm.tools.mcp", "exactly one of url and service"],
        id="mcp-without-endpoint",
    ),
    pytest.param(
        agent(
            "a",
            runtime={"handler": {"type": "llm"}},
            llm={
                **LLM,
                "tools": {
                    "a2a": [{"name": "r", "url": "http://r/"}, {"name": "r", "url": "http://s/"}]
                },
            },
        ),
        ["spec.llm.tools.a2a", "names must be unique"],
        id="a2a-names-twice",
    ),
    pytest.param(
        agent(
            "a",
            runtime={"handler": {"type": "llm"}},
            llm={**LLM, "tools": {"a2a": [{"name": "r", "url": "https://me:pw@r.example/"}]}},
        ),
        ["spec.llm.tools.a2a[0].url", "should match"],
        id="a2a-url-with-user-info",
    ),
    pytest.param(
        agent(
            "a",
            runtime={"handler": {"type": "llm"}},
            llm={**LLM, "tools": {"a2a": [{"name": "R_1", "url": "ftp://r.example/"}]}},
        ),
        ["spec.llm.tools.a2a[0].url", "spec.llm.tools.a2a[0].name"],
        id="a2a-scheme-and-name",
    ),
    pytest.param(
        agent(
            "a",
            runtime={"handler": {"type": "llm"}},
            llm={
                **LLM,
                "approvals": {"tools": [{"tool": "rm"}, {"tool": "rm", "approval": "never"}]},
            },
        ),
        ["spec.llm.approvals.tools", "names must be unique"],
        id="tool-approval-twice",
    ),
    pytest.param(
        agent(
            "a",
            runtime={"handler": {"type": "llm"}},
            llm={**LLM, "approvals": {"tools": [{"tool": "rm", "approval": "always"}]}},
        ),
        ["spec.llm.approvals", "needs at least one approver"],
        id="tool-approval-without-approvers",
    ),
    pytest.param(
        agent(
            "a",
            runtime={"handler": {"type": "llm"}},
            llm={
                **LLM,
                "approvals": {
                    "default": {
                        "approval": "destructive",
                        "approvers": {"groups": ["ops"]},
                        "timeout": "145h",
                    }
                },
            },
        ),
        ["spec.llm.approvals", "at most 6 days"],
        id="tool-approval-past-6-days",
    ),
    pytest.param(
        agent(
            "a",
            runtime={"handler": {"type": "llm"}},
            llm={
                **LLM,
                "approvals": {
                    "tools": [
                        {
                            "tool": "refund",
                            "approval": "costAbove",
                            "cost": "amount",
                            "approvers": {"users": ["alice"]},
                        }
                    ]
                },
            },
        ),
        ["spec.llm.approvals", "costAbove needs a cost expression and a threshold"],
        id="tool-approval-cost-above-without-threshold",
    ),
    pytest.param(
        agent("a", contract={"errorStates": [{"name": "TooLong"}, {"name": "TooLong"}]}),
        ["spec.contract.errorStates", "error state names must be unique"],
        id="duplicate-error-states",
    ),
]


def _apply(cluster: ClusterEndpoints, namespace: str, manifest: dict[str, Any]) -> str:
    return cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest), check=False
    )


@pytest.mark.parametrize(("manifest", "expected"), REFUSED)
def test_the_api_server_refuses_the_manifest_naming_the_field(
    cluster: ClusterEndpoints,
    namespace: str,
    crds: None,
    manifest: dict[str, Any],
    expected: list[str],
) -> None:
    refusal = _apply(cluster, namespace, manifest)

    for fragment in expected:
        assert fragment in refusal, refusal
    assert not cluster.kubectl("get", "agents,workflows", "-n", namespace, "-o", "name").strip()


def test_the_edges_of_what_is_valid_are_accepted(
    cluster: ClusterEndpoints, namespace: str, crds: None
) -> None:
    manifests = [
        agent(
            "edges",
            timeout="11s",
            messaging={"ackWait": "30s"},  # 11s + 10s = 70% of 30s exactly
            retry={"maxAttempts": 2, "backoff": ["0s"]},
            deadLetter={"retention": MAX_DURATION_TEXT},
            contract={"outputSubjects": ["troupe.other.agents.edges-two.in.p0", "x.$y"]},
            runtime={
                "env": [
                    {"name": "my var.1", "value": "x"},
                    {"name": "PYTHONPATH", "value": "/app"},
                    {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                ],
                "envFrom": [{"secretRef": {"name": "keys.v1"}, "prefix": "KEYS_"}],
                "nodeSelector": {"kubernetes.io/arch": "amd64", "pool": ""},
                "sidecars": [{"name": "server", "image": "busybox", "command": ["sleep"]}],
                "resources": {
                    "requests": {"cpu": "0.5", "example.com/gpu": 1},
                    "limits": {"cpu": "500m", "example.com/gpu": "1"},
                },
                "tolerations": [{"operator": "Exists"}],
                "handler": {"type": "http", "url": "https://localhost:8443/x"},
            },
        ),
        _workflow("edges", trigger={"subject": "orders.*.created.>"}, deadline="1.5m"),
        agent(
            "edges-llm",
            runtime={"handler": {"type": "llm"}},
            llm={
                **LLM,
                "approvals": {
                    "default": {"approval": "destructive", "approvers": {"users": ["alice"]}},
                    "tools": [
                        {
                            "tool": "rm",
                            "approval": "always",
                            "approvers": {"groups": ["ops"]},
                            "timeout": "144h",
                            "onTimeout": "approve",
                        },
                        {"tool": "ls"},
                    ],
                },
            },
        ),
    ]
    for manifest in manifests:
        assert "created" in _apply(cluster, namespace, manifest)

    stored = json.loads(cluster.kubectl("get", "agent/edges", "-n", namespace, "-o", "json"))
    assert stored["spec"]["deadLetter"]["retention"] == "2562047h47m16.854s"
    # What the API server stored, defaults included, the operator's models parse.
    assert AgentSpec.model_validate(stored["spec"]).dead_letter.retention == MAX_DURATION
    flow = json.loads(cluster.kubectl("get", "workflow/edges", "-n", namespace, "-o", "json"))
    assert WorkflowSpec.model_validate(flow["spec"]).deadline == timedelta(seconds=90)


def test_one_millisecond_past_the_largest_duration_is_refused(
    cluster: ClusterEndpoints, namespace: str, crds: None
) -> None:
    refusal = _apply(cluster, namespace, agent("a", deadLetter={"retention": "2562047h47m16.855s"}))

    assert "spec.deadLetter.retention" in refusal


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("agents.spec.timeout", "a duration such as 30s or 1h30m; default 1m"),
        ("agents.spec.messaging.ackWait", "default 2m"),
        ("agents.spec.runtime.sidecars.name", "never runtime"),
        ("workflows.spec.trigger.subject", "not under troupe."),
        ("workflows.spec.steps.timeout", "default 5m"),
        ("agents.spec.llm.tools.a2a.timeout", "default 30s"),
        ("agents.spec.llm.tools.a2a.auth.bearerTokenSecret", "to the card's origin only"),
        ("agents.spec.llm.approvals.default.approval", "destructiveHint false"),
        ("agents.spec.llm.approvals.tools.approvers.groups", "whose members may decide"),
    ],
)
def test_kubectl_explain_shows_the_description(
    cluster: ClusterEndpoints, crds: None, field: str, expected: str
) -> None:
    explained = " ".join(cluster.kubectl("explain", field).split())

    assert expected in explained, explained


def test_wide_output_shows_dead_letters_and_redeliveries(
    cluster: ClusterEndpoints, namespace: str, crds: None
) -> None:
    _apply(cluster, namespace, agent("wide"))

    plain = cluster.kubectl("get", "agents", "-n", namespace).splitlines()[0].split()
    wide = cluster.kubectl("get", "agents", "-n", namespace, "-o", "wide").splitlines()[0].split()

    assert "DEADLETTERS" not in plain
    assert {"DEADLETTERS", "REDELIVERED"} <= set(wide)


def _either(pattern: str, max_size: int) -> st.SearchStrategy[str]:
    """A value the pattern allows, or any short printable-ASCII text (mostly refused)."""
    return st.one_of(
        st.from_regex(pattern, fullmatch=True).filter(lambda s: len(s) <= max_size),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12),
    )


AGENT_VALUES = st.fixed_dictionaries(
    {},
    optional={
        "timeout": _either(DURATION_PATTERN, DURATION_MAX_LENGTH),
        "ackWait": _either(DURATION_PATTERN, DURATION_MAX_LENGTH),
        "output": _either(grammar.OUTPUT_SUBJECT_PATTERN, grammar.SUBJECT_MAX),
        "env": _either(grammar.ENV_NAME_PATTERN, grammar.ENV_NAME_MAX),
        "image": _either(grammar.IMAGE_PATTERN, grammar.IMAGE_MAX),
        "quantity": _either(grammar.QUANTITY_PATTERN, grammar.QUANTITY_MAX),
        "resource": _either(grammar.RESOURCE_NAME_PATTERN, grammar.RESOURCE_NAME_MAX),
        "label": _either(grammar.QUALIFIED_NAME_PATTERN, grammar.QUALIFIED_NAME_MAX),
        "sidecar": _either(grammar.DNS_LABEL_PATTERN, grammar.DNS_LABEL_MAX),
    },
)


def _agent_spec(drawn: dict[str, str]) -> dict[str, Any]:
    runtime: dict[str, Any] = {}
    spec: dict[str, Any] = {"role": "judged", "runtime": runtime}
    if "timeout" in drawn:
        spec["timeout"] = drawn["timeout"]
    if "ackWait" in drawn:
        spec["messaging"] = {"ackWait": drawn["ackWait"]}
    if "output" in drawn:
        spec["contract"] = {"outputSubjects": [drawn["output"]]}
    if "env" in drawn:
        runtime["env"] = [{"name": drawn["env"], "value": "x"}]
    if "image" in drawn:
        runtime["image"] = drawn["image"]
    if "quantity" in drawn or "resource" in drawn:
        name, amount = drawn.get("resource", "cpu"), drawn.get("quantity", "1")
        runtime["resources"] = {"requests": {name: amount}, "limits": {name: amount}}
    if "label" in drawn:
        runtime["nodeSelector"] = {drawn["label"]: "v"}
    if "sidecar" in drawn:
        runtime["sidecars"] = [{"name": drawn["sidecar"], "image": "busybox"}]
    return spec


def _model_accepts(model: type[Any], spec: dict[str, Any]) -> bool:
    try:
        model.model_validate(spec)
    except ValidationError:
        return False
    return True


def _server_accepts(api_client: Any, namespace: str, kind: str, spec: dict[str, Any]) -> bool:
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": {"name": "judged"},
        "spec": spec,
    }
    try:
        client.CustomObjectsApi(api_client).create_namespaced_custom_object(
            GROUP, VERSION, namespace, f"{kind.lower()}s", manifest, dry_run="All"
        )
    except ApiException as refusal:
        if refusal.status != 422:
            raise
        return False
    return True


JUDGED = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@JUDGED
@given(drawn=AGENT_VALUES)
def test_the_api_server_and_the_models_accept_the_same_agents(
    api_client: Any, namespace: str, crds: None, drawn: dict[str, str]
) -> None:
    spec = _agent_spec(drawn)

    assert _server_accepts(api_client, namespace, "Agent", spec) == _model_accepts(
        AgentSpec, spec
    ), spec


@JUDGED
@given(
    subject=_either(grammar.TRIGGER_SUBJECT_PATTERN, grammar.SUBJECT_MAX),
    deadline=_either(DURATION_PATTERN, DURATION_MAX_LENGTH),
)
def test_the_api_server_and_the_models_accept_the_same_workflows(
    api_client: Any, namespace: str, crds: None, subject: str, deadline: str
) -> None:
    spec = {
        "trigger": {"subject": subject},
        "deadline": deadline,
        "steps": [{"name": "a", "agentRef": "a", "timeout": deadline}],
    }

    assert _server_accepts(api_client, namespace, "Workflow", spec) == _model_accepts(
        WorkflowSpec, spec
    ), spec
