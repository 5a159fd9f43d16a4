"""ModelProviders against the real API server and operator, probing a real OpenAI-compatible
server on loopback: Ready with reason Probed, Unreachable, Unauthorized, SecretMissing and
InvalidResponse, back to Ready once fixed, the key in no status and no Event; an LLM Agent
waits for the provider it names and turns Ready when it appears, with the key as a Secret
reference and its hour's usage in status; and the CRD and the models judge every spec
alike."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from tests.integration.operator_support import (
    CRDS,
    OperatorProcess,
    agent,
    apply,
    condition,
    explained,
    get,
    jetstream,
    stream_config,
    stream_names,
)
from tests.integration.test_crd_property import values
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_devcluster.scripted_llm import ScriptedLlm
from troupe_operator.api import ModelProviderSpec
from troupe_operator.api.common import GROUP, VERSION
from troupe_runtime.contract import naming
from troupe_runtime.contract.llm import a2a_token_env, provider_key_env
from troupe_runtime.contract.usage import Usage

DEADLINE = 45.0
KEY = "sk-test-0123456789abcdef"
WRONG_KEY = "sk-wrong-fedcba9876543210"
CLOSED = "http://127.0.0.1:1/v1"
"""Nothing listens on port 1: the connection is refused at once."""


@pytest.fixture(autouse=True)
def _explained(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> Iterator[None]:
    with explained(cluster, namespace, operator):
        yield


def provider(name: str, base_url: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelProvider",
        "metadata": {"name": name},
        "spec": {"baseUrl": base_url, "models": [{"name": "scripted-model"}], **spec},
    }


def secret(name: str, key: str, value: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "data": {key: base64.b64encode(value.encode()).decode()},
    }


def ready_with(
    cluster: ClusterEndpoints, namespace: str, kind: str, name: str, status: str, reason: str
) -> dict[str, Any]:
    """The object once its Ready condition has ``status`` and ``reason``."""

    def found() -> dict[str, Any] | None:
        body = get(cluster, namespace, kind, name)
        ready = condition(body)
        return body if ready and (ready["status"], ready["reason"]) == (status, reason) else None

    body: dict[str, Any] = wait_for(found, DEADLINE, f"{kind} {name} Ready={status} {reason}")
    return body


def events(cluster: ClusterEndpoints, namespace: str, name: str) -> list[dict[str, Any]]:
    listed = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json"))
    return [e for e in listed["items"] if e["involvedObject"]["name"] == name]


def test_kubectl_explain_describes_the_models(
    cluster: ClusterEndpoints, operator: OperatorProcess
) -> None:
    explained_text = cluster.kubectl("explain", "modelprovider.spec.models")
    assert "The models it serves; an Agent may name only these." in explained_text
    assert "contextWindow" in explained_text
    pricing = cluster.kubectl("explain", "modelprovider.spec.models.pricing.inputPerMillion")
    assert "Dollars per million input tokens" in pricing


def test_a_provider_that_lists_its_models_is_ready_probed(
    cluster: ClusterEndpoints, namespace: str, scripted_llm: ScriptedLlm
) -> None:
    apply(cluster, namespace, provider("local", scripted_llm.base_url))

    body = ready_with(cluster, namespace, "modelprovider", "local", "True", "Probed")

    assert body["status"]["models"] == ["scripted-model"]
    assert scripted_llm.requests[0].path == "/v1/models"
    printed = cluster.kubectl("get", "mp", "-n", namespace)
    assert "Probed" in printed
    assert "scripted-model" in printed


def test_an_idle_pass_writes_nothing(
    cluster: ClusterEndpoints, namespace: str, scripted_llm: ScriptedLlm
) -> None:
    apply(cluster, namespace, provider("idle", scripted_llm.base_url))
    ready_with(cluster, namespace, "modelprovider", "idle", "True", "Probed")
    # The baseline is taken after the first resync's probe: right after Ready, kopf still
    # writes its own bookkeeping (the handled-configuration annotation), which is no pass.
    settled = len(scripted_llm.requests) + 1
    wait_for(lambda: len(scripted_llm.requests) >= settled, DEADLINE, "a probe at resync")
    first = get(cluster, namespace, "modelprovider", "idle")
    probes = len(scripted_llm.requests)

    wait_for(
        lambda: len(scripted_llm.requests) >= probes + 2, DEADLINE, "two more probes (resyncs)"
    )

    later = get(cluster, namespace, "modelprovider", "idle")
    assert later["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]


def test_an_unreachable_endpoint_is_retried_and_ready_once_it_answers(
    cluster: ClusterEndpoints, namespace: str, scripted_llm: ScriptedLlm
) -> None:
    apply(cluster, namespace, provider("away", CLOSED))

    body = ready_with(cluster, namespace, "modelprovider", "away", "False", "Unreachable")
    reconciling = condition(body, "Reconciling")
    stalled = condition(body, "Stalled")
    assert reconciling is not None
    assert stalled is not None
    assert (reconciling["status"], stalled["status"]) == ("True", "False")

    apply(cluster, namespace, provider("away", scripted_llm.base_url))
    ready_with(cluster, namespace, "modelprovider", "away", "True", "Probed")
    reasons = [e["reason"] for e in events(cluster, namespace, "away")]
    assert "Unreachable" in reasons
    assert "Probed" in reasons


def test_a_refused_key_stalls_as_unauthorized_until_the_secret_is_fixed(
    cluster: ClusterEndpoints, namespace: str
) -> None:
    with ScriptedLlm(models=["scripted-model"], api_key=KEY) as server:
        apply(cluster, namespace, secret("llm-key", "apiKey", WRONG_KEY))
        manifest = provider("keyed", server.base_url, apiKeySecret={"name": "llm-key"})
        apply(cluster, namespace, manifest)

        body = ready_with(cluster, namespace, "modelprovider", "keyed", "False", "Unauthorized")
        stalled = condition(body, "Stalled")
        assert stalled is not None
        assert stalled["status"] == "True"
        assert "Secret llm-key" in stalled["message"]
        assert server.requests[0].headers.get("authorization") == f"Bearer {WRONG_KEY}"

        apply(cluster, namespace, secret("llm-key", "apiKey", KEY))
        body = ready_with(cluster, namespace, "modelprovider", "keyed", "True", "Probed")

    told = json.dumps(body["status"]) + json.dumps(events(cluster, namespace, "keyed"))
    assert KEY not in told
    assert WRONG_KEY not in told


def test_a_missing_secret_or_key_stalls_as_secret_missing_until_it_exists(
    cluster: ClusterEndpoints, namespace: str, scripted_llm: ScriptedLlm
) -> None:
    manifest = provider("unkeyed", scripted_llm.base_url, apiKeySecret={"name": "absent"})
    apply(cluster, namespace, manifest)
    body = ready_with(cluster, namespace, "modelprovider", "unkeyed", "False", "SecretMissing")
    assert "Secret absent does not exist" in (condition(body) or {})["message"]
    assert not scripted_llm.requests, "nothing is probed without the key"

    apply(cluster, namespace, secret("absent", "other", KEY))
    ready_with(cluster, namespace, "modelprovider", "unkeyed", "False", "SecretMissing")

    apply(cluster, namespace, secret("absent", "apiKey", KEY))
    ready_with(cluster, namespace, "modelprovider", "unkeyed", "True", "Probed")


class _NotAnApi(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html>a web page, not an API</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def web_page() -> Iterator[str]:
    """A real HTTP server answering every GET with an HTML page."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotAnApi)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_answer_that_is_no_model_list_stalls_as_invalid_response(
    cluster: ClusterEndpoints, namespace: str, web_page: str
) -> None:
    apply(cluster, namespace, provider("page", web_page))

    body = ready_with(cluster, namespace, "modelprovider", "page", "False", "InvalidResponse")

    assert "spec.baseUrl" in (condition(body) or {})["message"]
    assert "<html>" not in json.dumps(body["status"])


def llm_agent(name: str, provider_name: str) -> dict[str, Any]:
    return agent(
        name,
        runtime={"handler": {"type": "llm"}},
        llm={"model": {"provider": provider_name, "model": "scripted-model"}},
    )


def test_an_agent_waits_for_its_provider_and_turns_ready_when_it_appears(
    cluster: ClusterEndpoints, namespace: str, scripted_llm: ScriptedLlm
) -> None:
    apply(cluster, namespace, llm_agent("thinker", "later"))

    waiting = ready_with(cluster, namespace, "agent", "thinker", "False", "ProviderMissing")
    assert "spec.llm.model.provider" in (condition(waiting) or {})["message"]
    assert (condition(waiting, "Stalled") or {})["status"] == "True"

    apply(cluster, namespace, secret("later-key", "apiKey", KEY))
    manifest = provider("later", scripted_llm.base_url, apiKeySecret={"name": "later-key"})
    apply(cluster, namespace, manifest)
    ready_with(cluster, namespace, "agent", "thinker", "True", "Ready")

    config_map = get(cluster, namespace, "configmap", naming.agent_config_map("thinker"))
    config = json.loads(config_map["data"]["config.json"])
    (resolved,) = config["llm"]["providers"]
    assert resolved["name"] == "later"
    assert resolved["apiKeyEnv"] == provider_key_env("later")
    assert KEY not in json.dumps(config_map)
    deployment = get(cluster, namespace, "deployment", "thinker")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (key_env,) = [e for e in container["env"] if e["name"] == provider_key_env("later")]
    assert key_env["valueFrom"]["secretKeyRef"] == {"name": "later-key", "key": "apiKey"}


def test_an_agent_waits_for_the_agents_it_calls_and_turns_ready_when_they_appear(
    cluster: ClusterEndpoints, namespace: str, scripted_llm: ScriptedLlm
) -> None:
    apply(cluster, namespace, provider("tools", scripted_llm.base_url))
    caller = llm_agent("caller", "tools")
    caller["spec"]["llm"]["tools"] = {"agents": [{"agent": "helper", "name": "ask_helper"}]}
    apply(cluster, namespace, caller)
    waiting = ready_with(cluster, namespace, "agent", "caller", "False", "AgentToolMissing")
    assert "spec.llm.tools.agents[0].agent" in (condition(waiting) or {})["message"]

    schema = {"type": "object", "properties": {"question": {"type": "string"}}}
    apply(cluster, namespace, agent("helper", contract={"inputSchema": schema}))
    ready_with(cluster, namespace, "agent", "caller", "True", "Ready")

    config_map = get(cluster, namespace, "configmap", naming.agent_config_map("caller"))
    (tool,) = json.loads(config_map["data"]["config.json"])["llm"]["agents"]
    assert tool["name"] == "ask_helper"
    assert tool["inboxSubject"] == naming.inbox_subject(namespace, "helper", 0)
    assert tool["inputSchema"] == schema
    assert tool["description"] == "test agent helper"


def test_an_a2a_token_is_read_from_its_secret_never_written_to_the_config_or_the_status(
    cluster: ClusterEndpoints,
    namespace: str,
    scripted_llm: ScriptedLlm,
    operator: OperatorProcess,
) -> None:
    apply(cluster, namespace, provider("remote", scripted_llm.base_url))
    caller = llm_agent("delegator", "remote")
    token_ref = {"name": "travel-token", "key": "token"}
    caller["spec"]["llm"]["tools"] = {
        "a2a": [
            {
                "name": "travel",
                "url": "https://travel.example/a2a",
                "auth": {"bearerTokenSecret": token_ref},
            }
        ]
    }
    apply(cluster, namespace, caller)
    waiting = ready_with(cluster, namespace, "agent", "delegator", "False", "SecretNotFound")
    assert (
        "spec.llm.tools.a2a[0].auth.bearerTokenSecret: Secret travel-token does not exist"
        in ((condition(waiting) or {})["message"])
    )

    apply(cluster, namespace, secret("travel-token", "token", KEY))
    ready = ready_with(cluster, namespace, "agent", "delegator", "True", "Ready")

    config_map = get(cluster, namespace, "configmap", naming.agent_config_map("delegator"))
    (tool,) = json.loads(config_map["data"]["config.json"])["llm"]["a2a"]
    assert (tool["name"], tool["url"], tool["tokenEnv"]) == (
        "travel",
        "https://travel.example/a2a",
        a2a_token_env("travel"),
    )
    deployment = get(cluster, namespace, "deployment", "delegator")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (token_env,) = [e for e in container["env"] if e["name"] == a2a_token_env("travel")]
    assert token_env["valueFrom"]["secretKeyRef"] == token_ref
    for shown in (config_map, deployment, ready, events(cluster, namespace, "delegator")):
        assert KEY not in json.dumps(shown)
    assert KEY not in operator.log_tail(100_000)


def test_a_model_the_provider_does_not_serve_is_named(
    cluster: ClusterEndpoints, namespace: str, scripted_llm: ScriptedLlm
) -> None:
    apply(cluster, namespace, provider("small", scripted_llm.base_url))
    manifest = agent(
        "picky",
        runtime={"handler": {"type": "llm"}},
        llm={"model": {"provider": "small", "model": "gpt-none"}},
    )
    apply(cluster, namespace, manifest)

    body = ready_with(cluster, namespace, "agent", "picky", "False", "ModelNotServed")

    assert "spec.llm.model.model" in (condition(body) or {})["message"]


def test_an_agents_status_sums_its_usage_of_the_last_hour(
    cluster: ClusterEndpoints, namespace: str, scripted_llm: ScriptedLlm
) -> None:
    apply(cluster, namespace, provider("counted", scripted_llm.base_url))
    apply(cluster, namespace, llm_agent("counter", "counted"))
    ready_with(cluster, namespace, "agent", "counter", "True", "Ready")
    minute = datetime.now(UTC).strftime("%Y%m%d%H%M")
    records = {
        f"counter.counted.scripted-model.{minute}": Usage(tokens_in=100, tokens_out=20),
        f"counter.counted.other.{minute}": Usage(tokens_in=1, tokens_out=2, cost_usd=0.5),
        f"someone.counted.scripted-model.{minute}": Usage(tokens_in=999),
    }

    async def put(js: Any) -> None:
        kv = await js.key_value(naming.usage_bucket(namespace))
        for key, used in records.items():
            await kv.put(key, used.model_dump_json(by_alias=True).encode())

    jetstream(cluster.nats_url, put)

    def usage() -> dict[str, Any] | None:
        found = get(cluster, namespace, "agent", "counter").get("status", {}).get("usage")
        return found if found and found.get("tokens") else None

    found = wait_for(usage, DEADLINE, "status.usage of agent counter")
    assert found == {
        "tokensIn": 101,
        "tokensOut": 22,
        "tokens": 123,
        "costUsd": 0.5,
        "window": "1h",
    }
    wide = cluster.kubectl("get", "agent", "counter", "-n", namespace, "-o", "wide")
    assert "123" in wide


def test_the_last_llm_agent_of_a_namespace_takes_its_usage_bucket_and_object_store(
    cluster: ClusterEndpoints, namespace: str, scripted_llm: ScriptedLlm
) -> None:
    apply(cluster, namespace, provider("stored", scripted_llm.base_url))
    apply(cluster, namespace, llm_agent("keeper", "stored"))
    ready_with(cluster, namespace, "agent", "keeper", "True", "Ready")
    shared = {
        naming.kv_stream(naming.usage_bucket(namespace)),
        "OBJ_" + naming.llm_object_store(namespace),
    }
    assert shared <= stream_names(cluster.nats_url)

    cluster.kubectl("delete", "agent", "keeper", "-n", namespace, "--wait=false")

    wait_for(
        lambda: not shared & stream_names(cluster.nats_url),
        DEADLINE,
        "the usage bucket and object store to go with the last LLM agent",
    )


def test_an_llm_agents_session_bucket_has_its_retention_and_goes_with_it(
    cluster: ClusterEndpoints, namespace: str, scripted_llm: ScriptedLlm
) -> None:
    explained_text = cluster.kubectl("explain", "agents.spec.llm.session.doubleTexting")
    assert "reject (dead-letter it, reason session-busy)" in " ".join(explained_text.split())
    apply(cluster, namespace, provider("remembering", scripted_llm.base_url))
    talker = llm_agent("talker", "remembering")
    talker["spec"]["llm"]["session"] = {"retention": "1h", "doubleTexting": "interrupt"}
    apply(cluster, namespace, talker)
    ready_with(cluster, namespace, "agent", "talker", "True", "Ready")
    bucket = naming.kv_stream(naming.session_bucket(namespace, "talker"))
    config = stream_config(cluster.nats_url, bucket)
    assert (config.max_age, config.max_msgs_per_subject) == (3600.0, 1)

    cluster.kubectl("delete", "agent", "talker", "-n", namespace, "--wait=false")

    wait_for(
        lambda: bucket not in stream_names(cluster.nats_url),
        DEADLINE,
        "the session bucket to go with its Agent",
    )


def test_a_session_retention_under_a_minute_is_refused_by_the_api_server(
    api_client: Any, namespace: str
) -> None:
    body = llm_agent("forgetful", "any")
    body["spec"]["llm"]["session"] = {"retention": "30s"}
    with pytest.raises(ApiException) as refused:
        client.CustomObjectsApi(api_client).create_namespaced_custom_object(
            GROUP, VERSION, namespace, "agents", body, dry_run="All"
        )
    assert refused.value.status == 422
    assert "spec.llm.session.retention" in str(refused.value.body)
    assert "at least 1m" in str(refused.value.body)


# The CRD and the models agree.

CRD = yaml.safe_load((CRDS / f"modelproviders.{GROUP}.yaml").read_text())
SPECS = values(CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"])
HEADERS = st.dictionaries(
    st.sampled_from(["Host", "authorization", "X-Team", "OpenAI-Organization", "bad key", "é"]),
    st.sampled_from(["a", "value with spaces", "line\nbreak"]),
    max_size=2,
)


@st.composite
def provider_specs(draw: st.DrawFn) -> dict[str, Any]:
    """Specs from the CRD's schema, with what only CEL or the models refuse mixed in:
    repeated model names, reserved or malformed header names."""
    spec: dict[str, Any] = draw(SPECS)
    if draw(st.booleans()) and spec.get("models"):
        spec["models"] = [*spec["models"], dict(spec["models"][0])]
    if draw(st.booleans()):
        spec["headers"] = draw(HEADERS)
    return spec


def _accepted_by_the_api_server(api_client: Any, namespace: str, spec: dict[str, Any]) -> bool:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelProvider",
        "metadata": {"name": "judged"},
        "spec": spec,
    }
    try:
        client.CustomObjectsApi(api_client).create_namespaced_custom_object(
            GROUP, VERSION, namespace, "modelproviders", body, dry_run="All"
        )
    except ApiException as error:
        if error.status != 422:
            raise
        return False
    return True


def _accepted_by_the_models(spec: dict[str, Any]) -> bool:
    try:
        ModelProviderSpec.model_validate(spec)
    except ValidationError:
        return False
    return True


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=provider_specs())
def test_the_crd_and_the_models_accept_and_refuse_alike(
    api_client: Any, namespace: str, spec: dict[str, Any]
) -> None:
    server = _accepted_by_the_api_server(api_client, namespace, spec)
    assert server == _accepted_by_the_models(spec), json.dumps(spec)
