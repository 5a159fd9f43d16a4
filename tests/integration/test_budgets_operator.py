"""Budgets against the real API server, operator and nats-server: the API server refuses what
the models refuse (and accepts what they accept); the operator writes the definition the
runtimes enforce, resolves an Agents selector and follows the Agents' labels, reads a ledger
written by hand into status and the printer columns, turns SoftLimitExceeded and
HardLimitExceeded on with a Warning Event each, exports its gauges, writes nothing on an
idle pass, deleting a Budget removes its definition and ledgers, and a definition no Budget
owns is swept."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from tests.health_support import argocd_health, kstatus
from tests.integration.operator_support import (
    API_VERSION,
    CRDS,
    OperatorProcess,
    agent,
    apply,
    condition,
    explained,
    get,
    install_crds,
    jetstream,
)
from tests.integration.test_crd_property import values
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_operator.api import BudgetSpec
from troupe_operator.api.common import GROUP, VERSION
from troupe_runtime.contract import naming
from troupe_runtime.contract.budget import (
    Amount,
    BudgetDefinition,
    BudgetWindow,
    Hold,
    Ledger,
    projected_exhaustion,
    window_id,
)

DEADLINE = 45.0
REFRESH_SECONDS = 1


def budget(name: str, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "scope": {"type": "Namespace"},
        "window": {"type": "Day"},
        "limits": {"tokens": {"soft": 800, "hard": 1000}},
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "Budget",
        "metadata": {"name": name},
        "spec": {**base, **spec},
    }


# The API server refuses what the models refuse.

REFUSED = [
    pytest.param(
        budget("b", scope={"type": "Agents"}),
        ["spec.scope.agents", "set exactly when scope.type is Agents"],
        id="agents-without-selector",
    ),
    pytest.param(
        budget("b", scope={"type": "Namespace", "agents": {}}),
        ["spec.scope.agents", "set exactly when scope.type is Agents"],
        id="selector-without-agents",
    ),
    pytest.param(
        budget("b", scope={"type": "Workflow"}),
        ["spec.scope.workflow", "set exactly when scope.type is Workflow"],
        id="workflow-without-name",
    ),
    pytest.param(
        budget("b", scope={"type": "Workflow", "workflow": "Not_A_Name"}),
        ["spec.scope.workflow", "should match"],
        id="workflow-not-a-dns-label",
    ),
    pytest.param(
        budget("b", window={"type": "Rolling"}),
        ["spec.window.duration", "set exactly when window.type is Rolling"],
        id="rolling-without-duration",
    ),
    pytest.param(
        budget("b", window={"type": "Day", "duration": "1h"}),
        ["spec.window.duration", "set exactly when window.type is Rolling"],
        id="duration-without-rolling",
    ),
    pytest.param(
        budget("b", window={"type": "Rolling", "duration": "0s"}),
        ["spec.window.duration", "greater than 0"],
        id="zero-duration",
    ),
    pytest.param(
        budget("b", window={"type": "Week"}), ["spec.window.type", "Unsupported value"], id="week"
    ),
    pytest.param(budget("b", limits={}), ["spec.limits", "needs tokens or costUsd"], id="no-limit"),
    pytest.param(
        budget("b", limits={"tokens": {"soft": 10, "hard": 5}}),
        ["spec.limits.tokens", "soft may not exceed"],
        id="token-soft-above-hard",
    ),
    pytest.param(
        budget("b", limits={"costUsd": {"soft": 2.5, "hard": 1}}),
        ["spec.limits.costUsd", "soft may not exceed"],
        id="cost-soft-above-hard",
    ),
    pytest.param(
        budget("b", limits={"tokens": {"hard": 0}}),
        ["spec.limits.tokens.hard", "greater than or equal to 1"],
        id="zero-tokens",
    ),
    pytest.param(
        budget("b", limits={"costUsd": {"hard": 0}}),
        ["spec.limits.costUsd.hard", "greater than 0"],
        id="zero-dollars",
    ),
    pytest.param(
        budget("b", limits={"costUsd": {"hard": 1e10}}),
        ["spec.limits.costUsd.hard", "less than or equal to"],
        id="absurd-dollars",
    ),
    pytest.param(
        budget("b", scope={"type": "Everything"}),
        ["spec.scope.type", "Unsupported value"],
        id="unknown-scope",
    ),
    pytest.param(budget("Upper"), ["metadata.name", "should match"], id="name-not-a-dns-label"),
]


@pytest.fixture(scope="module")
def crds(cluster: ClusterEndpoints) -> None:
    install_crds(cluster)


def _apply(cluster: ClusterEndpoints, namespace: str, manifest: dict[str, Any]) -> str:
    return cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest), check=False
    )


@pytest.mark.parametrize(("manifest", "expected"), REFUSED)
def test_the_api_server_refuses_an_invalid_budget_naming_the_field(
    cluster: ClusterEndpoints,
    namespace: str,
    crds: None,
    manifest: dict[str, Any],
    expected: list[str],
) -> None:
    refusal = _apply(cluster, namespace, manifest)

    for fragment in expected:
        assert fragment in refusal, refusal
    assert not cluster.kubectl("get", "budgets", "-n", namespace, "-o", "name").strip()


def test_the_edges_of_a_valid_budget_are_accepted(
    cluster: ClusterEndpoints, namespace: str, crds: None
) -> None:
    manifests = [
        budget("equal", limits={"tokens": {"soft": 5, "hard": 5}, "costUsd": {"hard": 1e9}}),
        budget(
            "agents",
            scope={
                "type": "Agents",
                "agents": {
                    "matchLabels": {"team": "research"},
                    "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}],
                },
            },
            window={"type": "Rolling", "duration": "168h"},
            limits={"costUsd": {"soft": 0.01}},
        ),
        budget("run", scope={"type": "Workflow", "workflow": "research"}, window={"type": "Run"}),
    ]
    for manifest in manifests:
        assert "created" in _apply(cluster, namespace, manifest)

    listed = cluster.kubectl("get", "bgt", "-n", namespace)
    assert listed.splitlines()[0].split()[:6] == [
        "NAME",
        "SCOPE",
        "WINDOW",
        "TOKENS",
        "HARD",
        "COST",
    ]
    stored = json.loads(cluster.kubectl("get", "budget/agents", "-n", namespace, "-o", "json"))
    assert BudgetSpec.model_validate(stored["spec"]).window.type == "Rolling"


CRD = yaml.safe_load((CRDS / f"budgets.{GROUP}.yaml").read_text())
SPECS = values(CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"])
SCOPES = st.sampled_from(["Namespace", "Agents", "Workflow"])
WINDOWS = st.sampled_from(["Run", "Hour", "Day", "Month", "Rolling"])


@st.composite
def budget_specs(draw: st.DrawFn) -> dict[str, Any]:
    """Specs from the CRD's schema, with what only CEL or the models refuse mixed in: a
    scope's target or a window's duration set or missing whatever the type, soft above
    hard, no limit at all."""
    spec: dict[str, Any] = draw(SPECS)
    scope = dict(spec.get("scope") or {})
    if draw(st.booleans()):
        scope["type"] = draw(SCOPES)
    if draw(st.booleans()):
        scope["agents"] = {"matchLabels": {"team": "a"}}
    if draw(st.booleans()):
        scope["workflow"] = "research"
    spec["scope"] = scope
    window = dict(spec.get("window") or {})
    if draw(st.booleans()):
        window["type"] = draw(WINDOWS)
    if draw(st.booleans()):
        window["duration"] = draw(st.sampled_from(["1h", "0s", "30m"]))
    spec["window"] = window
    if draw(st.booleans()):
        soft, hard = draw(st.integers(1, 100)), draw(st.integers(1, 100))
        spec["limits"] = {"tokens": {"soft": soft, "hard": hard}}
    if draw(st.booleans()):
        spec["limits"] = {}
    return spec


def _accepted_by_the_api_server(api_client: Any, namespace: str, spec: dict[str, Any]) -> bool:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Budget",
        "metadata": {"name": "judged"},
        "spec": spec,
    }
    try:
        client.CustomObjectsApi(api_client).create_namespaced_custom_object(
            GROUP, VERSION, namespace, "budgets", body, dry_run="All"
        )
    except ApiException as error:
        if error.status != 422:
            raise
        return False
    return True


def _accepted_by_the_models(spec: dict[str, Any]) -> bool:
    try:
        BudgetSpec.model_validate(spec)
    except ValidationError:
        return False
    return True


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=budget_specs())
def test_the_crd_and_the_models_accept_and_refuse_budgets_alike(
    api_client: Any, namespace: str, crds: None, spec: dict[str, Any]
) -> None:
    server = _accepted_by_the_api_server(api_client, namespace, spec)
    assert server == _accepted_by_the_models(spec), json.dumps(spec)


# The operator.


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    return {"TROUPE_BUDGET_REFRESH": str(REFRESH_SECONDS)}


@pytest.fixture
def watched(cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess) -> Iterator[str]:
    """The test's namespace, with the operator running; its logs printed on failure."""
    with explained(cluster, namespace, operator):
        yield namespace


def _kv_get(nats_url: str, namespace: str, key: str) -> bytes | None:
    async def read(js: JetStreamContext) -> bytes | None:
        try:
            kv = await js.key_value(naming.budget_bucket(namespace))
            return (await kv.get(key)).value
        except NotFoundError:
            return None

    return jetstream(nats_url, read)


def _kv_put(nats_url: str, namespace: str, key: str, value: bytes) -> None:
    async def write(js: JetStreamContext) -> None:
        await (await js.key_value(naming.budget_bucket(namespace))).put(key, value)

    jetstream(nats_url, write)


def _subjects(nats_url: str, namespace: str, filter: str) -> dict[str, int]:
    bucket = naming.budget_bucket(namespace)

    async def listed(js: JetStreamContext) -> dict[str, int]:
        info = await js.stream_info(
            naming.kv_stream(bucket), subjects_filter=f"$KV.{bucket}.{filter}"
        )
        return dict(info.state.subjects or {})

    return jetstream(nats_url, listed)


def _bucket_exists(nats_url: str, namespace: str) -> bool:
    async def exists(js: JetStreamContext) -> bool:
        try:
            await js.stream_info(naming.kv_stream(naming.budget_bucket(namespace)))
        except NotFoundError:
            return False
        return True

    return jetstream(nats_url, exists)


def _revision(nats_url: str, namespace: str, key: str) -> int | None:
    async def read(js: JetStreamContext) -> int | None:
        kv = await js.key_value(naming.budget_bucket(namespace))
        return (await kv.get(key)).revision

    return jetstream(nats_url, read)


def _definition(nats_url: str, namespace: str, name: str) -> BudgetDefinition | None:
    stored = _kv_get(nats_url, namespace, naming.budget_definition_key(name))
    return None if stored is None else BudgetDefinition.model_validate_json(stored)


def _ledger(spent: int, held: int = 0, cost: float = 0.0, window: str = "Day") -> tuple[str, bytes]:
    now = time.time()
    wid = window_id(BudgetWindow(type=window), now, None)  # type: ignore[arg-type]
    assert wid is not None
    holds = {"by-hand": Hold(amount=Amount(tokens=held), expires=now + 600)} if held else {}
    ledger = Ledger(
        window=wid,
        started=now - 60,
        updated=now,
        spent=Amount(tokens=spent, cost_usd=cost),
        holds=holds,
    )
    return wid, ledger.model_dump_json(by_alias=True).encode()


def _status_where(
    cluster: ClusterEndpoints, namespace: str, name: str, test: Any, what: str
) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        body = get(cluster, namespace, "budget", name)
        return body if test(body) else None

    body: dict[str, Any] = wait_for(found, DEADLINE, what)
    return body


def _condition_is(body: dict[str, Any], kind: str, status: str) -> bool:
    found = condition(body, kind)
    return found is not None and found["status"] == status


def _events(cluster: ClusterEndpoints, namespace: str, name: str) -> list[dict[str, Any]]:
    listed = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json"))
    return [
        e
        for e in listed["items"]
        if e["involvedObject"]["name"] == name and e["involvedObject"]["kind"] == "Budget"
    ]


def _passes(operator: OperatorProcess) -> float:
    """Budget passes the operator made so far, from its own metrics."""
    with urllib.request.urlopen(operator.metrics_url, timeout=5) as response:
        text = response.read().decode()
    found = re.findall(
        r'^troupe_operator_reconciles_total\{kind="Budget",result="ok"\} (\S+)$', text, re.M
    )
    return float(found[0]) if found else 0.0


def test_the_definition_is_written_and_the_budget_is_ready(
    cluster: ClusterEndpoints, watched: str
) -> None:
    apply(cluster, watched, budget("team"))

    body = _status_where(
        cluster, watched, "team", lambda b: _condition_is(b, "Ready", "True"), "Ready"
    )

    assert (condition(body) or {})["reason"] == "Enforced"
    assert argocd_health(body).status == "Healthy"
    assert kstatus(body).status == "Current"
    written = _definition(cluster.nats_url, watched, "team")
    assert written is not None
    assert (written.name, written.scope, written.generation) == ("team", "Namespace", 1)
    assert written.limits.tokens is not None
    assert written.limits.tokens.hard == 1000
    assert body["status"]["spent"] == {"tokens": 0, "costUsd": 0.0}
    assert body["status"]["remaining"] == {"tokens": 1000}
    assert body["status"]["window"] == window_id(BudgetWindow(type="Day"), time.time(), None)

    cluster.kubectl(
        "patch",
        "budget",
        "team",
        "-n",
        watched,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"limits": {"tokens": {"soft": 800, "hard": 2000}}}}),
    )

    wait_for(
        lambda: (
            (d := _definition(cluster.nats_url, watched, "team")) is not None and d.generation == 2
        ),
        DEADLINE,
        "the definition of generation 2",
    )
    changed = _definition(cluster.nats_url, watched, "team")
    assert changed is not None
    assert changed.limits.tokens is not None
    assert changed.limits.tokens.hard == 2000


def test_the_selector_follows_the_agents_labels(cluster: ClusterEndpoints, watched: str) -> None:
    for name, labels in (("alpha", {"team": "a"}), ("beta", {"team": "b"})):
        manifest = agent(name)
        manifest["metadata"]["labels"] = labels
        apply(cluster, watched, manifest)
    selector = {"type": "Agents", "agents": {"matchLabels": {"team": "a"}}}
    apply(cluster, watched, budget("picky", scope=selector))

    def agents_named() -> list[str] | None:
        written = _definition(cluster.nats_url, watched, "picky")
        return None if written is None else written.agents

    wait_for(lambda: agents_named() == ["alpha"], DEADLINE, "the definition naming alpha")
    cluster.kubectl("label", "agent", "beta", "team=a", "--overwrite", "-n", watched)
    wait_for(lambda: agents_named() == ["alpha", "beta"], DEADLINE, "beta picked as well")
    cluster.kubectl("label", "agent", "alpha", "team-", "-n", watched)
    wait_for(lambda: agents_named() == ["beta"], DEADLINE, "alpha no longer picked")

    body = _status_where(
        cluster,
        watched,
        "picky",
        lambda b: (b.get("status") or {}).get("agents") == ["beta"],
        "status.agents [beta]",
    )
    assert body["status"]["observedGeneration"] == 1


def test_status_reads_a_ledger_written_by_hand(
    cluster: ClusterEndpoints, watched: str, operator: OperatorProcess
) -> None:
    apply(
        cluster,
        watched,
        budget("ledgered", limits={"tokens": {"hard": 1000}, "costUsd": {"hard": 2.0}}),
    )
    _status_where(
        cluster, watched, "ledgered", lambda b: _condition_is(b, "Ready", "True"), "Ready"
    )
    wid, value = _ledger(spent=300, held=100, cost=0.25)
    _kv_put(cluster.nats_url, watched, naming.budget_ledger_key("ledgered", wid), value)

    body = _status_where(
        cluster,
        watched,
        "ledgered",
        lambda b: (b.get("status") or {}).get("spent", {}).get("tokens") == 300,
        "status.spent.tokens 300",
    )

    status = body["status"]
    assert status["spent"] == {"tokens": 300, "costUsd": 0.25}
    assert status["reserved"] == {"tokens": 100, "costUsd": 0.0}
    assert status["remaining"] == {"tokens": 600, "costUsd": 1.75}
    assert status["burnRate"]["tokensPerHour"] > 0
    assert status["windowStart"].endswith("T00:00:00Z")
    # A Day window's burn is spent over the hours since midnight: these limits are reached
    # before midnight only early in the UTC day, and the projection is then shown. Whether
    # it is follows the contract's own arithmetic on this ledger, at any hour.
    definition = BudgetDefinition.model_validate(
        {
            "name": "ledgered",
            "generation": 1,
            "scope": "Namespace",
            "window": {"type": "Day"},
            "limits": {"tokens": {"hard": 1000}, "costUsd": {"hard": 2.0}},
        }
    )
    reachable = projected_exhaustion(Ledger.model_validate_json(value), definition, time.time())
    assert ("projectedExhaustion" in status) == (reachable is not None), (reachable, status)
    row = cluster.kubectl("get", "budgets", "-n", watched, "--no-headers").split()
    # NAME SCOPE WINDOW TOKENS HARD COST REMAINING READY AGE
    assert row[:8] == ["ledgered", "Namespace", "Day", "300", "1000", "0.25", "600", "True"]
    with urllib.request.urlopen(operator.metrics_url, timeout=5) as response:
        exported = response.read().decode()
    labels = f'budget="ledgered",namespace="{watched}"'
    assert f'troupe_budget_spent{{{labels},unit="tokens"}} 300.0' in exported
    assert f'troupe_budget_remaining{{{labels},unit="costUsd"}} 1.75' in exported
    hard = f'budget="ledgered",level="hard",namespace="{watched}"'
    assert f"troupe_budget_limit_exceeded{{{hard}}} 0.0" in exported


def test_soft_and_hard_limits_turn_conditions_and_warn(
    cluster: ClusterEndpoints, watched: str, operator: OperatorProcess
) -> None:
    apply(cluster, watched, budget("capped"))
    _status_where(cluster, watched, "capped", lambda b: _condition_is(b, "Ready", "True"), "Ready")

    wid, value = _ledger(spent=850)
    _kv_put(cluster.nats_url, watched, naming.budget_ledger_key("capped", wid), value)
    soft = _status_where(
        cluster,
        watched,
        "capped",
        lambda b: _condition_is(b, "SoftLimitExceeded", "True"),
        "SoftLimitExceeded",
    )
    assert _condition_is(soft, "HardLimitExceeded", "False")
    assert _condition_is(soft, "Ready", "True")

    wid, value = _ledger(spent=1000)
    _kv_put(cluster.nats_url, watched, naming.budget_ledger_key("capped", wid), value)
    hard = _status_where(
        cluster,
        watched,
        "capped",
        lambda b: _condition_is(b, "HardLimitExceeded", "True"),
        "HardLimitExceeded",
    )
    assert "calls are refused" in (condition(hard, "HardLimitExceeded") or {})["message"]
    assert hard["status"]["remaining"] == {"tokens": 0}

    def warnings() -> set[str] | None:
        found = {e["reason"] for e in _events(cluster, watched, "capped") if e["type"] == "Warning"}
        return found if {"SoftLimitExceeded", "HardLimitExceeded"} <= found else None

    assert wait_for(warnings, DEADLINE, "the Warning Events") == {
        "SoftLimitExceeded",
        "HardLimitExceeded",
    }
    # One Event per transition, however many passes saw the budget exceeded.
    passes = _passes(operator)
    wait_for(lambda: _passes(operator) >= passes + 3, DEADLINE, "three more Budget passes")
    reasons = [e["reason"] for e in _events(cluster, watched, "capped")]
    assert reasons.count("SoftLimitExceeded") == 1, reasons
    assert reasons.count("HardLimitExceeded") == 1, reasons


def test_an_idle_pass_writes_nothing(
    cluster: ClusterEndpoints, watched: str, operator: OperatorProcess
) -> None:
    apply(cluster, watched, budget("idle"))
    _status_where(cluster, watched, "idle", lambda b: _condition_is(b, "Ready", "True"), "Ready")
    # kopf writes its own bookkeeping right after the first pass: wait for two refreshes.
    settled = _passes(operator) + 2
    wait_for(lambda: _passes(operator) >= settled, DEADLINE, "two Budget passes")
    first = get(cluster, watched, "budget", "idle")
    stored = _revision(cluster.nats_url, watched, naming.budget_definition_key("idle"))
    passes = _passes(operator)

    wait_for(lambda: _passes(operator) >= passes + 3, DEADLINE, "three more Budget passes")

    later = get(cluster, watched, "budget", "idle")
    assert later["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    # The definition was not rewritten either: its revision is the same.
    assert _revision(cluster.nats_url, watched, naming.budget_definition_key("idle")) == stored


def test_deleting_a_budget_removes_its_definition_and_ledgers(
    cluster: ClusterEndpoints, watched: str
) -> None:
    apply(cluster, watched, budget("doomed"))
    _status_where(cluster, watched, "doomed", lambda b: _condition_is(b, "Ready", "True"), "Ready")
    wid, value = _ledger(spent=10)
    _kv_put(cluster.nats_url, watched, naming.budget_ledger_key("doomed", wid), value)
    assert _definition(cluster.nats_url, watched, "doomed") is not None

    cluster.kubectl("delete", "budget", "doomed", "-n", watched, "--timeout=45s")

    # The namespace's last Budget, and no LLM agent watches the bucket: it goes too.
    assert not _bucket_exists(cluster.nats_url, watched)


def test_deleting_one_of_two_budgets_keeps_the_bucket_and_the_other(
    cluster: ClusterEndpoints, watched: str
) -> None:
    for name in ("kept", "doomed"):
        apply(cluster, watched, budget(name))
        _status_where(cluster, watched, name, lambda b: _condition_is(b, "Ready", "True"), "Ready")
    wid, value = _ledger(spent=10)
    _kv_put(cluster.nats_url, watched, naming.budget_ledger_key("doomed", wid), value)

    cluster.kubectl("delete", "budget", "doomed", "-n", watched, "--timeout=45s")

    assert _definition(cluster.nats_url, watched, "doomed") is None
    assert _subjects(cluster.nats_url, watched, naming.budget_ledger_wildcard("doomed")) == {}
    assert _definition(cluster.nats_url, watched, "kept") is not None


def test_the_budget_bucket_stays_while_an_llm_agent_watches_it(
    cluster: ClusterEndpoints, watched: str
) -> None:
    thinker = agent(
        "thinker",
        runtime={"handler": {"type": "llm"}},
        llm={"model": {"provider": "absent", "model": "m"}},
    )
    apply(cluster, watched, thinker)
    apply(cluster, watched, budget("cap"))
    _status_where(cluster, watched, "cap", lambda b: _condition_is(b, "Ready", "True"), "Ready")

    cluster.kubectl("delete", "budget", "cap", "-n", watched, "--timeout=45s")
    assert _bucket_exists(cluster.nats_url, watched)
    assert _definition(cluster.nats_url, watched, "cap") is None

    cluster.kubectl("delete", "agent", "thinker", "-n", watched, "--timeout=45s")
    assert not _bucket_exists(cluster.nats_url, watched)


def test_a_definition_no_budget_owns_is_swept(cluster: ClusterEndpoints, watched: str) -> None:
    apply(cluster, watched, budget("owner"))
    _status_where(cluster, watched, "owner", lambda b: _condition_is(b, "Ready", "True"), "Ready")
    ghost = spending_definition("ghost")
    _kv_put(cluster.nats_url, watched, naming.budget_definition_key("ghost"), ghost)
    wid, value = _ledger(spent=10)
    _kv_put(cluster.nats_url, watched, naming.budget_ledger_key("ghost", wid), value)

    wait_for(
        lambda: _definition(cluster.nats_url, watched, "ghost") is None,
        DEADLINE,
        "the orphaned definition to be purged",
    )

    assert _subjects(cluster.nats_url, watched, naming.budget_ledger_wildcard("ghost")) == {}
    assert _definition(cluster.nats_url, watched, "owner") is not None


def spending_definition(name: str) -> bytes:
    """A definition as the operator would write it for a Budget that does not exist."""
    written = BudgetDefinition(
        name=name,
        generation=1,
        scope="Namespace",
        window=BudgetWindow(type="Day"),
        limits=BudgetSpec.model_validate(budget(name)["spec"]).limits,
    )
    return written.model_dump_json(by_alias=True, exclude_none=True).encode()
