"""The operator's LLM builders, behaviour by behaviour: the Agent's ``spec.llm`` rules,
its resolution into the runtime config (providers, keys, prompt, tools), the JetStream
settings of an LLM agent, its usage over the last hour, and a ModelProvider's probe as
status."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from tests.unit.golden_support import assert_golden
from troupe_operator.api import AgentSpec, ModelProviderSpec, ModelProviderStatus
from troupe_operator.builders import jetstream, llm, model_provider, status, usage, workload
from troupe_operator.builders.model_provider import Probe
from troupe_operator.builders.pods import Owner
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.agent_resources import build_agent_resources, rate_limit_bucket_config
from troupe_runtime.contract.llm import MAX_DEFERRALS, SYSTEM_PROMPT_DIR, provider_key_env
from troupe_runtime.contract.llm_policy import LlmPolicy
from troupe_runtime.contract.run_state import RunState
from troupe_runtime.contract.usage import Usage

OWNER = Owner("research", "analyst", uid="uid-1")
NOW = datetime(2026, 12, 1, 12, 30, 20, tzinfo=UTC)
KEY = "sk-very-secret-key"

PROVIDER = ModelProviderSpec.model_validate(
    {
        "baseUrl": "http://127.0.0.1:8080/v1",
        "apiKeySecret": {"name": "openai-key"},
        "models": [
            {"name": "small", "pricing": {"inputPerMillion": 1, "outputPerMillion": 2}},
            {"name": "large"},
        ],
    }
)
LOCAL = ModelProviderSpec.model_validate(
    {"baseUrl": "http://127.0.0.1:9000/v1", "models": [{"name": "smollm2"}]}
)
CALLEE = AgentSpec.model_validate(
    {"role": "Finds sources", "contract": {"inputSchema": {"type": "object"}}}
)


def agent(llm_policy: dict[str, Any] | None = None, **handler: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "role": "Analyses sources",
        "runtime": {"handler": {"type": "llm", **handler}},
    }
    if llm_policy is not None:
        body["llm"] = llm_policy
    return body


POLICY = {
    "model": {"provider": "openai", "model": "small"},
    "fallbacks": [{"provider": "local", "model": "smollm2"}],
    "systemPrompt": {"configMapKeyRef": {"name": "prompts", "key": "analyst.txt"}},
    "tools": {
        "mcp": [
            {"name": "search", "service": {"name": "tools", "port": 8000}},
            {"name": "web", "url": "http://127.0.0.1:7000/mcp"},
        ],
        "agents": [{"agent": "retriever"}],
    },
}


def resolved(policy: dict[str, Any] = POLICY, **found: Any) -> llm.Resolution:
    providers = {"openai": PROVIDER, "local": LOCAL}
    callees = {"retriever": CALLEE}
    for name, value in found.items():
        (providers if name in providers else callees)[name] = value
    return llm.resolve(OWNER.namespace, LlmPolicy.model_validate(policy), providers, callees)


# The Agent's rules.


def test_an_llm_handler_takes_spec_llm_instead_of_a_secret() -> None:
    assert AgentSpec.model_validate(agent(POLICY)).llm is not None
    assert AgentSpec.model_validate(agent(secretName="legacy")).llm is None


@pytest.mark.parametrize(
    "body",
    [agent(), agent(POLICY, secretName="legacy")],
    ids=["neither", "both"],
)
def test_an_llm_handler_needs_exactly_one_of_secret_name_and_llm(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=r"exactly one of runtime\.handler\.secretName"):
        AgentSpec.model_validate(body)


def test_spec_llm_without_an_llm_handler_is_refused() -> None:
    body = {"role": "Echoes", "llm": POLICY}
    with pytest.raises(ValidationError, match=r"llm needs runtime\.handler\.type llm"):
        AgentSpec.model_validate(body)


# Resolution.


def test_resolution_names_each_provider_once_with_its_key_variable() -> None:
    runtime = resolved().runtime
    assert runtime is not None
    assert [(p.name, p.api_key_env) for p in runtime.providers] == [
        ("openai", provider_key_env("openai")),
        ("local", None),
    ]
    assert runtime.provider("openai") is not None
    assert runtime.providers[0].spec == PROVIDER


def test_mcp_service_references_become_cluster_urls() -> None:
    runtime = resolved().runtime
    assert runtime is not None
    assert [(t.name, t.url) for t in runtime.mcp] == [
        ("search", "http://tools.research.svc:8000/mcp"),
        ("web", "http://127.0.0.1:7000/mcp"),
    ]


def test_agent_tools_become_the_callees_inbox_schema_and_role() -> None:
    runtime = resolved().runtime
    assert runtime is not None
    (tool,) = runtime.agents
    assert tool.name == "retriever"
    assert tool.inbox_subject == naming.inbox_subject("research", "retriever", 0)
    assert tool.input_schema == {"type": "object"}
    assert tool.description == "Finds sources"


def test_a_prompt_from_a_config_map_is_read_from_its_mounted_file() -> None:
    runtime = resolved().runtime
    assert runtime is not None
    assert runtime.system_prompt_file == SYSTEM_PROMPT_DIR / "analyst.txt"
    (reference,) = llm.prompt_config_maps(runtime.policy)
    assert (reference.name, reference.key) == ("prompts", "analyst.txt")


def test_a_missing_provider_is_named_by_field_and_waited_for() -> None:
    resolution = resolved(local=None)
    assert resolution.runtime is None
    (problem,) = resolution.problems
    assert problem.field == "spec.llm.fallbacks[0].provider"
    assert problem.reason == llm.PROVIDER_MISSING
    assert status.problem_condition(problem) == status.LLM_RESOLVED


def test_a_model_the_provider_does_not_serve_is_named_with_what_it_serves() -> None:
    policy = {**POLICY, "model": {"provider": "openai", "model": "gpt-9"}}
    (problem,) = resolved(policy).problems
    assert problem.field == "spec.llm.model.model"
    assert problem.reason == llm.MODEL_NOT_SERVED
    assert "small, large" in problem.message


def test_a_missing_or_refused_callee_is_named_by_field() -> None:
    for found in (None, llm.INVALID):
        (problem,) = resolved(retriever=found).problems
        assert problem.field == "spec.llm.tools.agents[0].agent"
        assert problem.reason == llm.AGENT_TOOL_MISSING


def test_a_provider_with_a_refused_spec_is_its_own_problem() -> None:
    (problem,) = resolved(openai=llm.INVALID).problems
    assert problem.reason == llm.PROVIDER_INVALID


# The pods.


def llm_config() -> tuple[AgentSpec, RuntimeConfig]:
    spec = AgentSpec.model_validate(agent(POLICY))
    config = workload.build_runtime_config(OWNER, spec, "nats://nats:4222", resolved().runtime)
    return spec, config


def test_llm_agent_deployment_matches_golden() -> None:
    spec, config = llm_config()
    assert_golden("llm_agent_deployment", workload.build_deployment(OWNER, spec, config))


def test_provider_keys_reach_the_pod_from_their_secret_never_the_config_map() -> None:
    spec, config = llm_config()
    deployment = workload.build_deployment(OWNER, spec, config)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    keys = [e for e in container["env"] if e["name"] == provider_key_env("openai")]
    assert keys == [
        {
            "name": provider_key_env("openai"),
            "valueFrom": {"secretKeyRef": {"name": "openai-key", "key": "apiKey"}},
        }
    ]
    data = workload.build_config_map(OWNER, config)["data"]
    assert "openai-key" in json.dumps(data)  # the Secret's name, for the runtime's errors
    assert "secretKeyRef" not in json.dumps(data)


def test_the_prompt_key_is_mounted_read_only_where_the_config_says() -> None:
    spec, config = llm_config()
    pod = workload.build_deployment(OWNER, spec, config)["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == llm.PROMPT_VOLUME]
    assert volume["configMap"] == {
        "name": "prompts",
        "items": [{"key": "analyst.txt", "path": "analyst.txt"}],
    }
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == llm.PROMPT_VOLUME]
    assert mount == {
        "name": llm.PROMPT_VOLUME,
        "mountPath": str(SYSTEM_PROMPT_DIR),
        "readOnly": True,
    }
    assert config.llm is not None
    assert config.llm.system_prompt_file is not None
    assert config.llm.system_prompt_file.parent == SYSTEM_PROMPT_DIR


def test_the_provider_secret_and_prompt_config_map_are_checked_before_pods_wait() -> None:
    spec, config = llm_config()
    (secret,) = llm.provider_secrets(config.llm)
    assert (secret.name, secret.key) == ("openai-key", "apiKey")
    assert "ModelProvider openai" in secret.field
    assert [r.name for r in workload.referenced_config_maps(spec)] == ["prompts"]


def test_a_legacy_llm_handler_is_unchanged() -> None:
    spec = AgentSpec.model_validate(agent(secretName="legacy"))
    config = workload.build_runtime_config(OWNER, spec, "nats://nats:4222")
    assert config.llm is None
    (container,) = workload.build_deployment(OWNER, spec, config)["spec"]["template"]["spec"][
        "containers"
    ]
    assert not any(e["name"].startswith("TROUPE_PROVIDER_KEY_") for e in container["env"])


# JetStream.


def test_llm_inbox_consumers_allow_the_deferrals_on_top_of_the_attempts() -> None:
    spec, config = llm_config()
    resources = build_agent_resources(config)
    assert {c.max_deliver for c in resources.consumers} == {
        spec.retry.max_attempts + 1 + MAX_DEFERRALS
    }


def test_an_llm_agent_provisions_the_usage_bucket_and_the_object_store() -> None:
    spec, config = llm_config()
    resources = jetstream.with_llm(build_agent_resources(config), OWNER.namespace, spec)
    (bucket,) = [b for b in resources.buckets if b.bucket == naming.usage_bucket("research")]
    assert bucket.ttl == 2 * 3600
    (store,) = jetstream.llm_object_stores(OWNER.namespace, spec)
    assert store.bucket == naming.llm_object_store("research")


def test_an_llm_agent_provisions_the_rate_limit_bucket_its_providers_limits_are_kept_in() -> None:
    spec, config = llm_config()
    resources = jetstream.with_llm(build_agent_resources(config), OWNER.namespace, spec)
    (bucket,) = [b for b in resources.buckets if b.bucket == naming.rate_limit_bucket("research")]
    assert bucket == rate_limit_bucket_config("research")
    again = jetstream.with_llm(resources, OWNER.namespace, spec)
    assert [b.bucket for b in again.buckets].count(naming.rate_limit_bucket("research")) == 1


def test_the_rate_limit_bucket_goes_with_the_last_agent_that_uses_it() -> None:
    spec, _ = llm_config()
    limits = naming.kv_stream(naming.rate_limit_bucket("research"))
    plain = AgentSpec.model_validate({"role": "Echoes"})
    limited = AgentSpec.model_validate({"role": "r", "rateLimit": {"rate": 1, "scope": "global"}})
    assert limits in jetstream.orphaned_streams("research", spec, [plain])
    assert limits not in jetstream.orphaned_streams("research", spec, [spec])
    assert limits not in jetstream.orphaned_streams("research", spec, [limited])
    assert limits not in jetstream.orphaned_streams("research", limited, [spec])


def test_the_budget_bucket_goes_with_the_last_llm_agent_unless_a_budget_stays() -> None:
    spec, _ = llm_config()
    budgets = naming.kv_stream(naming.budget_bucket("research"))
    plain = AgentSpec.model_validate({"role": "Echoes"})
    assert budgets in jetstream.orphaned_streams("research", spec, [plain])
    assert budgets not in jetstream.orphaned_streams("research", spec, [plain], True)
    assert budgets not in jetstream.orphaned_streams("research", spec, [spec])
    assert budgets not in jetstream.orphaned_streams("research", plain, [])


def test_other_agents_get_neither() -> None:
    spec = AgentSpec.model_validate({"role": "Echoes"})
    config = workload.build_runtime_config(OWNER, spec, "nats://nats:4222")
    resources = build_agent_resources(config)
    assert jetstream.with_llm(resources, OWNER.namespace, spec) == resources
    assert jetstream.llm_object_stores(OWNER.namespace, spec) == []


def test_the_last_llm_agent_takes_the_usage_bucket_and_object_store_with_it() -> None:
    spec, _ = llm_config()
    other = AgentSpec.model_validate({"role": "Echoes"})
    gone = jetstream.orphaned_streams("research", spec, [other])
    assert naming.kv_stream(naming.usage_bucket("research")) in gone
    assert "OBJ_" + naming.llm_object_store("research") in gone
    assert naming.kv_stream(naming.usage_bucket("research")) not in jetstream.orphaned_streams(
        "research", spec, [spec]
    )


# Usage over the last hour.


def minute(at: datetime) -> str:
    return at.strftime(usage.MINUTE_FORMAT)


def test_only_the_agents_keys_of_the_last_hour_count() -> None:
    keys = [
        f"analyst.openai.small.{minute(NOW)}",
        f"analyst.openai.small.{minute(NOW - timedelta(minutes=59))}",
        f"analyst.openai.small.{minute(NOW - timedelta(minutes=60))}",
        f"analyst.local.smollm2.{minute(NOW - timedelta(hours=3))}",
        f"analyst-two.openai.small.{minute(NOW)}",
        "analyst.garbage",
    ]
    assert usage.recent_keys(keys, "analyst", NOW) == sorted(keys[:2])


def test_usage_sums_tokens_and_cost_and_skips_what_is_not_usage() -> None:
    records = {
        "a": Usage(tokens_in=10, tokens_out=5, cost_usd=0.1).model_dump_json(by_alias=True),
        "b": Usage(tokens_in=1, tokens_out=2, cost_usd=0.2).model_dump_json(by_alias=True),
        "c": "not json",
    }
    summed = usage.summed({k: v.encode() for k, v in records.items()})
    assert (summed.tokens_in, summed.tokens_out, summed.tokens) == (11, 7, 18)
    assert summed.cost_usd == pytest.approx(0.3)
    assert summed.window == "1h"


def test_the_same_records_always_give_the_same_usage() -> None:
    records = {f"k{i}": Usage(cost_usd=0.1).model_dump_json().encode() for i in range(7)}
    assert usage.summed(records) == usage.summed(dict(reversed(records.items())))


# A ModelProvider's status.


def provider_status(
    probe: Probe | None,
    found: dict[str, bytes] | None = None,
    previous: ModelProviderStatus | None = None,
    spec: ModelProviderSpec = PROVIDER,
    now: datetime = NOW,
) -> ModelProviderStatus:
    secret = model_provider.secret_observation(
        spec, {"apiKey": KEY.encode()} if found is None else found
    )
    return model_provider.provider_status(
        previous or ModelProviderStatus(), 1, now, spec, secret, probe
    )


def condition(found: ModelProviderStatus, type: str) -> tuple[str, str]:
    (match,) = [c for c in found.conditions if c.type == type]
    return match.status, match.reason


def test_a_listed_model_list_is_ready_probed() -> None:
    found = provider_status(Probe("listed", models=("small", "large", "extra")))
    assert condition(found, status.READY) == ("True", "Probed")
    assert condition(found, status.STALLED) == ("False", "Reconciled")
    assert found.models == ["extra", "large", "small"]


def test_a_declared_model_the_endpoint_does_not_list_is_mentioned_not_fatal() -> None:
    found = provider_status(Probe("listed", models=("small",)))
    assert condition(found, status.READY) == ("True", "Probed")
    ready = next(c for c in found.conditions if c.type == status.READY)
    assert "does not list large" in ready.message


@pytest.mark.parametrize(
    ("probe", "reason", "stalled"),
    [
        (Probe("unreachable", "answered HTTP 503"), "Unreachable", False),
        (Probe("unauthorized", "HTTP 401"), "Unauthorized", True),
        (Probe("invalid", "answered HTTP 404"), "InvalidResponse", True),
    ],
    ids=["unreachable", "unauthorized", "invalid"],
)
def test_a_failed_probe_says_why_and_whether_a_person_must_act(
    probe: Probe, reason: str, stalled: bool
) -> None:
    found = provider_status(probe)
    assert condition(found, status.READY) == ("False", reason)
    assert condition(found, status.STALLED)[0] == ("True" if stalled else "False")
    assert condition(found, status.RECONCILING)[0] == ("False" if stalled else "True")


@pytest.mark.parametrize("found", [{}, {"other": b"x"}], ids=["no-secret", "no-key"])
def test_a_missing_secret_or_key_stalls_as_secret_missing(found: dict[str, bytes]) -> None:
    spec = PROVIDER
    secret = model_provider.secret_observation(spec, found or None)
    result = model_provider.provider_status(ModelProviderStatus(), 1, NOW, spec, secret, None)
    assert condition(result, status.READY) == ("False", "SecretMissing")
    assert condition(result, status.STALLED) == ("True", "SecretMissing")


def test_no_message_carries_the_key() -> None:
    for probe in (
        Probe("listed", models=("small",)),
        Probe("unauthorized", "HTTP 401"),
        Probe("unreachable", "ConnectError: refused"),
    ):
        assert KEY not in provider_status(probe).model_dump_json()


def test_an_unchanged_probe_changes_nothing() -> None:
    first = provider_status(Probe("listed", models=("small", "large")))
    later = provider_status(
        Probe("listed", models=("large", "small")), previous=first, now=NOW + timedelta(hours=1)
    )
    assert later == first


def test_a_provider_without_a_key_needs_no_secret() -> None:
    secret = model_provider.secret_observation(LOCAL, None)
    found = model_provider.provider_status(
        ModelProviderStatus(), 1, NOW, LOCAL, secret, Probe("listed", models=("smollm2",))
    )
    assert condition(found, status.READY) == ("True", "Probed")


def test_the_crd_refuses_what_the_contract_refuses() -> None:
    with pytest.raises(ValidationError, match="unique"):
        ModelProviderSpec.model_validate(
            {"baseUrl": "http://x/v1", "models": [{"name": "a"}, {"name": "a"}]}
        )
    with pytest.raises(ValidationError, match="headers may not set"):
        ModelProviderSpec.model_validate(
            {"baseUrl": "http://x/v1", "models": [{"name": "a"}], "headers": {"Host": "y"}}
        )


def test_the_workflow_status_shows_the_last_runs_tokens_and_cost() -> None:
    run = RunState(
        run_id="r1",
        status="Succeeded",
        started_at=NOW,
        finished_at=NOW,
        usage=Usage(tokens_in=30, tokens_out=12, cost_usd=0.0123456789),
    )
    last = status.last_run(run)
    assert last is not None
    assert (last.tokens_in, last.tokens_out, last.cost_usd) == (30, 12, 0.012346)
