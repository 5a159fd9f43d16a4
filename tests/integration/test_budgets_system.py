"""Budgets end to end on the local cluster: the real API server and operator, runtime and
engine pods on the process node, a nats-server of this module's own (so it can be killed
and restarted), and the scripted model server, which counts every call's tokens exactly
and records what it served (``ScriptedLlm.served``).

Each call's hold is its estimated prompt plus ``max_tokens`` (``agent/llm/router.py``); the
scripted model counts the prompt as the estimate does plus ``TEMPLATE_TOKENS`` a message
(a chat template: what a real provider counts and the estimate misses), so where a test
says so an answer spends a little more than its hold, and the hard limit can be passed by
at most what the calls in flight spent beyond their holds.

- 3 replicas, 20 concurrent runs, one Namespace budget: spent ≤ hard + (replicas x in
  flight) x the largest (actual - hold); the ledger counts exactly what was served; every
  refused call is dead-lettered budget-exceeded and its run ends BudgetExceeded.
- Every component killed mid-run (both runtime pods, the engine, the operator, the
  nats-server): every run still succeeds, and the ledger is exact in this sense (the
  holds' TTL, 600 s, is far past the test, so no hold is reaped while it runs): spent
  counts each answer the runtime received and committed, once, and each call a kill cut
  off keeps its whole hold (to be charged in full when it expires); so spent ≤ delivered
  ≤ billed ≤ spent + held, with delivered the tokens of the answers the model server sent
  whole and billed those it answered at all (a caller killed mid-answer cuts it off); and
  the ledger with those holds expired (``contract.budget.reap``) counts spent + held, at
  least all that was billed.
- Soft limit: an Event and SoftLimitExceeded, calls go on; hard: refused, dead-lettered,
  HardLimitExceeded.
- Nested: a run's calls count against its Workflow's Run budget and the namespace's Day
  budget alike; the Workflow budget stops the first run, the namespace's the second.
- A run stopped at its budget ends BudgetExceeded with the steps it finished and their
  outputs (the scripted answers, their usage as served).
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests.integration.operator_support import (
    API_VERSION,
    OperatorProcess,
    apply,
    condition,
    explained,
    get,
    install_crds,
    jetstream,
    wait_ready,
    workflow,
)
from tests.integration.test_llm_agents_e2e import kill_pod_processes, llm_agent, model_provider
from troupe_devcluster import launcher
from troupe_devcluster.fixtures import ClusterEndpoints, create_namespace, wait_for
from troupe_devcluster.kube import core_v1
from troupe_devcluster.layout import Layout
from troupe_devcluster.scripted_llm import CountedUsage, ScriptedLlm, Served, Text
from troupe_runtime.agent.llm.tokens import estimate_tokens
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.budget import BudgetWindow, Ledger, reap, window_id
from troupe_runtime.contract.dead_letters import REASON_HEADER
from troupe_runtime.contract.envelope import CloudEvent

MODEL = "scripted-model"
TEMPLATE_TOKENS = 3
DEADLINE = 60.0
RUNS_DEADLINE = 180.0
"""20 runs through 6 slots, or redeliveries after kills (ackWait): generous, never a sleep."""
DAY = BudgetWindow(type="Day")


# The module's own nats-server, and the operator pointed at it.


@pytest.fixture(scope="module")
def own_nats() -> Iterator[Layout]:
    """A nats-server only this module's operator, pods and engines use: one the tests may
    SIGKILL and restart without touching the session's."""
    layout = launcher.up_nats()
    try:
        yield layout
    finally:
        launcher.down(layout)


@pytest.fixture(scope="module")
def operator_env(own_nats: Layout) -> dict[str, str]:
    return {"TROUPE_NATS_URL": own_nats.nats_url, "TROUPE_BUDGET_REFRESH": "1"}


@pytest.fixture(scope="module")
def crds(cluster: ClusterEndpoints, operator: OperatorProcess) -> None:
    install_crds(cluster)
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/budgets.troupe.dev", "--timeout=30s"
    )


@pytest.fixture
def fresh_namespace(api_client: Any, crds: None) -> Iterator[str]:
    name = create_namespace(api_client)
    yield name
    core_v1(api_client).delete_namespace(name)


# Manifests.


def budget(name: str, scope: dict[str, Any], window: str, **tokens: int) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Budget",
        "metadata": {"name": name},
        "spec": {"scope": scope, "window": {"type": window}, "limits": {"tokens": tokens}},
    }


def worker(
    name: str, *, max_tokens: int, replicas: int = 1, in_flight: int = 1, timeout: str = "20s"
) -> dict[str, Any]:
    """An LLM agent asking the scripted model once per message."""
    ack_wait = {"20s": "45s", "10s": "30s"}[timeout]
    manifest = llm_agent(
        name,
        "scripted",
        MODEL,
        llm={
            "systemPrompt": {"text": "Answer briefly."},
            "maxTokens": max_tokens,
            "maxTurns": 1,
        },
        timeout=timeout,
        messaging={"ackWait": ack_wait, "maxInFlight": in_flight},
    )
    manifest["spec"]["runtime"]["replicas"] = replicas
    return manifest


def provider(scripted: ScriptedLlm) -> dict[str, Any]:
    return model_provider("scripted", scripted.base_url, MODEL)


# NATS look-ups, on the module's own server.


def ledgers(url: str, namespace: str, name: str) -> dict[str, Ledger]:
    """Every window's ledger of budget ``name``, by window id."""

    async def read(js: JetStreamContext) -> dict[str, Ledger]:
        try:
            kv = await js.key_value(naming.budget_bucket(namespace))
        except NotFoundError:
            return {}
        prefix = naming.budget_ledger_wildcard(name).removesuffix(">")
        found = {}
        try:
            keys = await kv.keys()
        except NotFoundError:
            return {}
        for key in keys:
            if key.startswith(prefix):
                entry = await kv.get(key)
                found[key.removeprefix(prefix)] = Ledger.model_validate_json(entry.value or b"")
        return found

    result: dict[str, Ledger] = jetstream(url, read)
    return result


def day_ledger(url: str, namespace: str, name: str, wid: str) -> Ledger:
    found = ledgers(url, namespace, name)
    assert set(found) <= {wid}, f"the test crossed a UTC midnight: ledgers {sorted(found)}"
    return found[wid]


def settled(url: str, namespace: str, name: str) -> dict[str, Ledger]:
    """Every window's ledger of budget ``name`` once none holds anything: a runtime writes
    a call's commit after the call returns (before its output, not awaited)."""

    def found() -> dict[str, Ledger] | None:
        windows = ledgers(url, namespace, name)
        return windows if not any(ledger.holds for ledger in windows.values()) else None

    result: dict[str, Ledger] = wait_for(found, DEADLINE, f"budget {name}'s ledgers settled")
    return result


def settled_day_ledger(url: str, namespace: str, name: str, wid: str) -> Ledger:
    found = settled(url, namespace, name)
    assert set(found) <= {wid}, f"the test crossed a UTC midnight: ledgers {sorted(found)}"
    return found[wid]


def publish(url: str, subject: str, events: list[CloudEvent]) -> None:
    async def send(js: JetStreamContext) -> None:
        for event in events:
            headers, payload = envelope.to_binary(event)
            await js.publish(subject, payload, headers=headers)

    jetstream(url, send)


def start_runs(url: str, trigger: str, count: int, data: Any) -> list[str]:
    runs = [uuid.uuid4().hex for _ in range(count)]
    publish(
        url,
        trigger,
        [CloudEvent(id=run, source="/tests/budgets", type="test.start", data=data) for run in runs],
    )
    return runs


def results(url: str, namespace: str, flow: str, runs: list[str]) -> dict[str, dict[str, Any]]:
    """The results published so far of ``runs``, by run id."""

    async def read(js: JetStreamContext) -> dict[str, dict[str, Any]]:
        found = {}
        for run in runs:
            subject = naming.workflow_subject(namespace, flow, "results", run)
            try:
                msg = await js.get_last_msg(naming.workflow_stream(namespace, flow), subject)
            except NotFoundError:
                continue
            found[run] = json.loads(msg.data or b"{}")
        return found

    result: dict[str, dict[str, Any]] = jetstream(url, read)
    return result


def all_results(url: str, namespace: str, flow: str, runs: list[str]) -> dict[str, Any]:
    def complete() -> dict[str, dict[str, Any]] | None:
        found = results(url, namespace, flow, runs)
        return found if len(found) == len(runs) else None

    found: dict[str, Any] = wait_for(
        complete, RUNS_DEADLINE, f"the results of {len(runs)} runs of {flow}", interval=0.5
    )
    return found


@dataclass(frozen=True)
class DeadLetter:
    reason: str | None
    run: str


def dead_letters(url: str, namespace: str, agent: str) -> list[DeadLetter]:
    async def read(js: JetStreamContext) -> list[DeadLetter]:
        stream = naming.dead_letter_stream(namespace, agent)
        state = (await js.stream_info(stream)).state
        letters = []
        for sequence in range(state.first_seq, state.last_seq + 1) if state.messages else ():
            msg = await js.get_msg(stream, sequence)
            headers = msg.headers or {}
            event = envelope.parse(headers, msg.data or b"")
            # A workflow's step event names its run; a message sent as is, itself.
            run = event.correlationid or event.id
            letters.append(DeadLetter(headers.get(REASON_HEADER), run))
        return letters

    result: list[DeadLetter] = jetstream(url, read)
    return result


# Accounting.


def answered(scripted: ScriptedLlm) -> list[Served]:
    return [s for s in scripted.served if s.status == 200]


def hold_of(served: Served, max_tokens: int) -> int:
    """The hold the router took for the call: its prompt's estimate plus max_tokens (a
    single-turn conversation learns no prompt overhead)."""
    return estimate_tokens(served.body["messages"]) + max_tokens


def conditioned(cluster: ClusterEndpoints, namespace: str, name: str, kind: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        body = get(cluster, namespace, "budget", name)
        met = condition(body, kind)
        return body if met is not None and met["status"] == "True" else None

    body: dict[str, Any] = wait_for(found, DEADLINE, f"budget {name} {kind}=True")
    return body


def warned(cluster: ClusterEndpoints, namespace: str, name: str, reason: str) -> None:
    def found() -> bool:
        listed = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json"))
        return any(
            e["involvedObject"]["kind"] == "Budget"
            and e["involvedObject"]["name"] == name
            and e["reason"] == reason
            and e["type"] == "Warning"
            for e in listed["items"]
        )

    wait_for(found, DEADLINE, f"a Warning Event {reason} on budget {name}")


def exceeded(
    operator: OperatorProcess, namespace: str, name: str, level: str, value: float
) -> None:
    """Wait until the operator's gauge troupe_budget_limit_exceeded says ``value``."""
    sample = (
        f'troupe_budget_limit_exceeded{{budget="{name}",level="{level}",'
        f'namespace="{namespace}"}} {value}'
    )

    def exported() -> bool:
        with urllib.request.urlopen(operator.metrics_url, timeout=5) as response:
            return sample in response.read().decode().splitlines()

    wait_for(exported, DEADLINE, sample)


def ready_all(cluster: ClusterEndpoints, namespace: str, kinds: list[tuple[str, str]]) -> None:
    for kind, name in kinds:
        wait_ready(cluster, namespace, kind, name)


def definition_written(url: str, namespace: str, name: str) -> None:
    async def read(js: JetStreamContext) -> bool:
        try:
            kv = await js.key_value(naming.budget_bucket(namespace))
            await kv.get(naming.budget_definition_key(name))
        except NotFoundError:
            return False
        return True

    wait_for(lambda: jetstream(url, read), DEADLINE, f"the definition of budget {name}")


# (a) Many replicas and runs, one budget.

REPLICAS = 3
IN_FLIGHT = 2
CONCURRENT_RUNS = 20
SHARED_MAX_TOKENS = 60
SHARED_HARD = 900


def test_replicas_and_concurrent_runs_overspend_one_budget_by_at_most_the_holds_in_flight(
    cluster: ClusterEndpoints,
    fresh_namespace: str,
    operator: OperatorProcess,
    own_nats: Layout,
    scripted_llm: ScriptedLlm,
) -> None:
    ns, url = fresh_namespace, own_nats.nats_url
    # The model uses all it may, and its template costs a little more than the estimate.
    scripted_llm.answer_by_default(
        Text("an answer", usage=CountedUsage(overhead=TEMPLATE_TOKENS), delay=0.3)
    )
    flow = workflow("shared", [{"name": "ask", "agentRef": "crowd"}], maxConcurrentRuns=20)
    wid = window_id(DAY, time.time(), None)
    assert wid is not None
    with explained(cluster, ns, operator):
        apply(cluster, ns, provider(scripted_llm))
        apply(
            cluster,
            ns,
            budget("namespace", {"type": "Namespace"}, "Day", hard=SHARED_HARD),
        )
        apply(
            cluster,
            ns,
            worker("crowd", max_tokens=SHARED_MAX_TOKENS, replicas=REPLICAS, in_flight=IN_FLIGHT),
        )
        apply(cluster, ns, flow)
        ready_all(
            cluster, ns, [("agent", "crowd"), ("workflow", "shared"), ("budget", "namespace")]
        )
        definition_written(url, ns, "namespace")

        runs = start_runs(url, flow["spec"]["trigger"]["subject"], CONCURRENT_RUNS, "question")
        outcomes = all_results(url, ns, "shared", runs)
        refusals = sum(o["status"] == "BudgetExceeded" for o in outcomes.values())

        def lettered() -> list[DeadLetter] | None:
            found = dead_letters(url, ns, "crowd")
            return found if len(found) == refusals else None

        letters = wait_for(lettered, DEADLINE, "a dead letter for each refused run")
        ledger = settled_day_ledger(url, ns, "namespace", wid)

    statuses = [o["status"] for o in outcomes.values()]
    served = answered(scripted_llm)
    succeeded = [run for run, o in outcomes.items() if o["status"] == "Succeeded"]
    refused = [run for run, o in outcomes.items() if o["status"] == "BudgetExceeded"]
    summary = (
        f"{len(served)} runs succeeded, {statuses.count('BudgetExceeded')} BudgetExceeded; "
        f"spent {ledger.spent.tokens} of hard {SHARED_HARD}, refusals {ledger.refusals}"
    )
    print(summary)
    assert len(succeeded) + len(refused) == CONCURRENT_RUNS, summary
    assert succeeded, summary
    assert refused, summary
    # One call per run that succeeded; a refused run made none.
    assert len(served) == len(succeeded), summary
    # The ledger counts exactly what the model served, and holds nothing any more.
    assert ledger.spent.tokens == sum(s.tokens for s in served), summary
    assert ledger.holds == {}, summary
    # Spent passes hard by at most what the calls in flight spent beyond their holds.
    over = max(s.tokens - hold_of(s, SHARED_MAX_TOKENS) for s in served)
    assert over == 2 * TEMPLATE_TOKENS
    assert ledger.spent.tokens <= SHARED_HARD + REPLICAS * IN_FLIGHT * over, summary
    # And no call was refused while there was room: a refusal means spent + the holds in
    # flight (at most one a slot, the refused one's included) passed hard.
    largest = max(hold_of(s, SHARED_MAX_TOKENS) for s in served)
    assert ledger.spent.tokens > SHARED_HARD - REPLICAS * IN_FLIGHT * largest, summary
    # Every refused call was dead-lettered as budget-exceeded, once, and its run says so.
    assert sorted(letter.run for letter in letters) == sorted(refused), letters
    assert {letter.reason for letter in letters} == {"budget-exceeded"}
    assert ledger.refusals == len(refused), summary
    for run in refused:
        assert "budget 'namespace'" in outcomes[run]["error"], outcomes[run]
        assert outcomes[run]["output"] == {"steps": {}}, outcomes[run]


# (b) Every component killed mid-run.

KILLED_RUNS = 6
KILLED_MAX_TOKENS = 50
KILLED_ANSWER = 12
"""Completion tokens of each answer: below max_tokens, so every call spends less than it
holds (served ≤ spent + held can then be asserted whatever a kill cut off)."""


def test_killing_every_component_mid_run_keeps_the_ledger_exact(
    cluster: ClusterEndpoints,
    fresh_namespace: str,
    operator: OperatorProcess,
    own_nats: Layout,
    scripted_llm: ScriptedLlm,
) -> None:
    ns, url = fresh_namespace, own_nats.nats_url
    scripted_llm.answer_by_default(
        Text("steady", usage=CountedUsage(completion=KILLED_ANSWER), delay=1.5)
    )
    steps: list[dict[str, Any]] = [
        {"name": "first", "agentRef": "steady"},
        {"name": "second", "agentRef": "steady", "dependsOn": ["first"]},
    ]
    flow = workflow("survivor", steps, maxConcurrentRuns=KILLED_RUNS)
    wid = window_id(DAY, time.time(), None)
    assert wid is not None
    with explained(cluster, ns, operator):
        apply(cluster, ns, provider(scripted_llm))
        apply(cluster, ns, budget("namespace", {"type": "Namespace"}, "Day", hard=10**9))
        apply(
            cluster,
            ns,
            worker("steady", max_tokens=KILLED_MAX_TOKENS, replicas=2, in_flight=2, timeout="10s"),
        )
        apply(cluster, ns, flow)
        ready_all(cluster, ns, [("agent", "steady"), ("workflow", "survivor")])
        definition_written(url, ns, "namespace")

        runs = start_runs(url, flow["spec"]["trigger"]["subject"], KILLED_RUNS, "go")
        # Mid-run: some calls answered, others in flight.
        wait_for(lambda: len(answered(scripted_llm)) >= 3, DEADLINE, "three answers")
        pods = json.loads(
            cluster.kubectl(
                "get", "pods", "-n", ns, "-o", "json", "--field-selector=status.phase=Running"
            )
        )["items"]
        runtimes = [p for p in pods if p["metadata"]["labels"].get("troupe.dev/agent") == "steady"]
        engines = [
            p for p in pods if p["metadata"]["labels"].get("troupe.dev/workflow") == "survivor"
        ]
        names = [p["metadata"]["name"] for p in pods]
        assert len(runtimes) == 2, names
        assert len(engines) == 1, names
        for pod in [*runtimes, *engines]:
            kill_pod_processes(cluster, pod)
        operator.kill()
        try:
            launcher.restart_nats(own_nats)
        finally:
            operator.start()

        outcomes = all_results(url, ns, "survivor", runs)
        ledger = day_ledger(url, ns, "namespace", wid)

    assert {o["status"] for o in outcomes.values()} == {"Succeeded"}, outcomes
    billed = answered(scripted_llm)
    delivered = [s for s in billed if s.complete]
    held = sum(h.amount.tokens for h in ledger.holds.values())
    spent = ledger.spent.tokens
    summary = (
        f"spent {spent}, held {held} in {len(ledger.holds)} holds; the model server delivered "
        f"{sum(s.tokens for s in delivered)} tokens in {len(delivered)} answers and was cut "
        f"off in {len(billed) - len(delivered)} more, {sum(s.tokens for s in billed)} in all, "
        f"for {2 * KILLED_RUNS} steps"
    )
    print(summary)
    assert ledger.reaped == {}, summary  # no hold is old enough to expire yet
    # What the runtime committed is what it was delivered (at most), and each answer it was
    # not delivered, or got and could not commit, has a hold at least as large.
    assert spent <= sum(s.tokens for s in delivered) <= sum(s.tokens for s in billed), summary
    assert sum(s.tokens for s in billed) <= spent + held, summary
    # Once the cut-off holds expire they are charged in full (the next hold on the ledger
    # reaps them): the ledger then counts at least all the model server answered.
    if ledger.holds:
        later = max(h.expires for h in ledger.holds.values()) + 1
        expired = reap(ledger, DAY, later)
        assert expired.holds == {}, summary
        assert expired.spent.tokens == spent + held, summary
        assert sum(s.tokens for s in billed) <= expired.spent.tokens, summary
    # At least one answer per step of every run was counted.
    assert ledger.spent.tokens >= 2 * KILLED_RUNS * (KILLED_ANSWER + 2), summary


# (c) Soft and hard limits.

SOLO_MAX_TOKENS = 40


def ask(url: str, namespace: str, agent: str, text: str) -> str:
    run = uuid.uuid4().hex
    event = CloudEvent(id=run, source="/tests/budgets", type="test.ask", data=text)
    publish(url, naming.inbox_subject(namespace, agent, 0), [event])
    return run


def test_a_soft_limit_warns_and_lets_calls_go_on_a_hard_limit_refuses_them(
    cluster: ClusterEndpoints,
    fresh_namespace: str,
    operator: OperatorProcess,
    own_nats: Layout,
    scripted_llm: ScriptedLlm,
) -> None:
    ns, url = fresh_namespace, own_nats.nats_url
    scripted_llm.answer_by_default(Text("fine", usage=CountedUsage(completion=10)))
    wid = window_id(DAY, time.time(), None)
    assert wid is not None
    with explained(cluster, ns, operator):
        apply(cluster, ns, provider(scripted_llm))
        # Each call holds about 45 and spends about 15: the soft limit passes on the fourth
        # call, the hard one refuses the call whose hold would not fit.
        apply(cluster, ns, budget("capped", {"type": "Namespace"}, "Day", soft=50, hard=120))
        apply(cluster, ns, worker("solo", max_tokens=SOLO_MAX_TOKENS))
        ready_all(cluster, ns, [("agent", "solo"), ("budget", "capped")])
        definition_written(url, ns, "capped")
        first = get(cluster, ns, "budget", "capped")
        assert (condition(first, "SoftLimitExceeded") or {}).get("status") != "True"

        def spent() -> int:
            found = ledgers(url, ns, "capped").get(wid)
            return found.spent.tokens if found is not None else 0

        # Below soft, then past it: the calls go on.
        while spent() <= 50:
            before = len(answered(scripted_llm))
            ask(url, ns, "solo", "one more")
            wait_for(
                lambda b=before: len(answered(scripted_llm)) > b and spent() > 0,
                DEADLINE,
                "the call to be answered",
            )
            wait_for(lambda: not ledgers(url, ns, "capped")[wid].holds, DEADLINE, "the commit")
        body = conditioned(cluster, ns, "capped", "SoftLimitExceeded")
        warned(cluster, ns, "capped", "SoftLimitExceeded")
        assert (condition(body, "HardLimitExceeded") or {}).get("status") != "True"
        exceeded(operator, ns, "capped", "soft", 1.0)
        exceeded(operator, ns, "capped", "hard", 0.0)
        calls_past_soft = len(answered(scripted_llm))
        after_soft = ask(url, ns, "solo", "still allowed")
        wait_for(
            lambda: len(answered(scripted_llm)) > calls_past_soft, DEADLINE, "a call past soft"
        )

        # Up to hard: the call that does not fit is refused and dead-lettered.
        refused: list[str] = []
        while not refused:
            before = len(answered(scripted_llm))
            wait_for(lambda: not ledgers(url, ns, "capped")[wid].holds, DEADLINE, "the commit")
            run = ask(url, ns, "solo", "and another")
            wait_for(
                lambda b=before, r=run: (
                    len(answered(scripted_llm)) > b
                    or any(d.run == r for d in dead_letters(url, ns, "solo"))
                ),
                DEADLINE,
                "an answer or a dead letter",
            )
            if any(d.run == run for d in dead_letters(url, ns, "solo")):
                refused.append(run)
        body = conditioned(cluster, ns, "capped", "HardLimitExceeded")
        warned(cluster, ns, "capped", "HardLimitExceeded")
        exceeded(operator, ns, "capped", "hard", 1.0)
        ledger = ledgers(url, ns, "capped")[wid]
        status = wait_for(
            lambda: (
                (found := get(cluster, ns, "budget", "capped")["status"])["spent"]["tokens"]
                == ledger.spent.tokens
                and found
            ),
            DEADLINE,
            "status.spent to be the ledger's",
        )
        assert status["remaining"] == {"tokens": 120 - ledger.spent.tokens}
        letters = dead_letters(url, ns, "solo")

    served = answered(scripted_llm)
    assert ledger.spent.tokens == sum(s.tokens for s in served)
    assert ledger.spent.tokens <= 120
    assert ledger.spent.tokens + hold_of(served[-1], SOLO_MAX_TOKENS) > 120
    assert ledger.refusals == 1
    assert [(d.reason, d.run) for d in letters] == [("budget-exceeded", refused[0])]
    assert after_soft not in {d.run for d in letters}


# (d) and (e): nested budgets, and a run stopped at its budget.

NESTED_MAX_TOKENS = 100
NESTED_ANSWER = 100
NESTED_INPUT = "write an essay"
NESTED_CALL = 111
"""What each call holds and spends: its prompt ("Answer briefly." and the step's input
``{"text":"write an essay"}``, 4 + 7 tokens) and all of its max_tokens."""
RUN_HARD = 300
"""Two calls (222) fit a run; a third (333) does not."""
NAMESPACE_HARD = 400
"""The first run's two calls and the third's hold fit (333), and so does the second run's
first call (333); its second (444) does not."""


@dataclass(frozen=True)
class Nested:
    namespace: str
    runs: list[str]
    outcomes: dict[str, dict[str, Any]]
    served: list[Served]
    run_ledgers: dict[str, Ledger]
    namespace_ledger: Ledger


@pytest.fixture(scope="module")
def nested(
    cluster: ClusterEndpoints,
    api_client: Any,
    crds: None,
    operator: OperatorProcess,
    own_nats: Layout,
) -> Iterator[Nested]:
    """Two runs, one after the other, of a three-step Workflow with a Run budget, in a
    namespace with a Day budget."""
    ns, url = create_namespace(api_client), own_nats.nats_url
    try:
        text = {"text": "trigger"}
        steps: list[dict[str, Any]] = [
            {"name": "draft", "agentRef": "writer", "input": text},
            {"name": "review", "agentRef": "writer", "dependsOn": ["draft"], "input": text},
            {"name": "publish", "agentRef": "writer", "dependsOn": ["review"], "input": text},
        ]
        flow = workflow("essay", steps)
        wid = window_id(DAY, time.time(), None)
        assert wid is not None
        with ScriptedLlm() as scripted, explained(cluster, ns, operator):
            scripted.answer_by_default(
                Text("a paragraph", usage=CountedUsage(completion=NESTED_ANSWER))
            )
            apply(cluster, ns, provider(scripted))
            apply(
                cluster,
                ns,
                budget("per-run", {"type": "Workflow", "workflow": "essay"}, "Run", hard=RUN_HARD),
            )
            apply(
                cluster, ns, budget("namespace", {"type": "Namespace"}, "Day", hard=NAMESPACE_HARD)
            )
            apply(cluster, ns, worker("writer", max_tokens=NESTED_MAX_TOKENS))
            apply(cluster, ns, flow)
            ready_all(cluster, ns, [("agent", "writer"), ("workflow", "essay")])
            definition_written(url, ns, "per-run")
            definition_written(url, ns, "namespace")
            outcomes: dict[str, dict[str, Any]] = {}
            runs = []
            for _ in range(2):
                [run] = start_runs(url, flow["spec"]["trigger"]["subject"], 1, NESTED_INPUT)
                runs.append(run)
                outcomes.update(all_results(url, ns, "essay", [run]))
            served = answered(scripted)
            yield Nested(
                ns,
                runs,
                outcomes,
                served,
                settled(url, ns, "per-run"),
                settled_day_ledger(url, ns, "namespace", wid),
            )
    finally:
        core_v1(api_client).delete_namespace(ns)


def test_a_runs_spending_counts_against_its_workflows_budget_and_the_namespaces(
    nested: Nested,
) -> None:
    first, second = (nested.outcomes[run] for run in nested.runs)
    # What the limits were sized for: each call held and spent NESTED_CALL.
    assert [hold_of(s, NESTED_MAX_TOKENS) for s in nested.served] == [NESTED_CALL] * 3
    assert [s.tokens for s in nested.served] == [NESTED_CALL] * 3
    # The first run is stopped by its Workflow's Run budget, the second by the namespace's.
    assert first["status"] == "BudgetExceeded", first
    assert "budget 'per-run'" in first["error"], first
    assert second["status"] == "BudgetExceeded", second
    assert "budget 'namespace'" in second["error"], second
    assert len(nested.served) == 3
    # Each run's ledger counts its own calls; the namespace's counts them all.
    by_run = {
        naming.run_window_token(run): ledger
        for run in nested.runs
        for key, ledger in nested.run_ledgers.items()
        if key == naming.run_window_token(run)
    }
    assert set(by_run) == {naming.run_window_token(run) for run in nested.runs}
    tokens = [s.tokens for s in nested.served]
    first_run, second_run = (by_run[naming.run_window_token(run)] for run in nested.runs)
    assert first_run.spent.tokens == sum(tokens[:2])
    assert second_run.spent.tokens == tokens[2]
    assert nested.namespace_ledger.spent.tokens == sum(tokens)
    assert first_run.refusals == 1
    assert second_run.refusals == 0
    assert nested.namespace_ledger.refusals == 1
    assert nested.namespace_ledger.holds == {}
    assert first_run.holds == second_run.holds == {}


def test_a_run_stopped_at_its_budget_reports_the_steps_it_finished_and_their_outputs(
    nested: Nested,
) -> None:
    first, second = (nested.outcomes[run] for run in nested.runs)
    served = nested.served

    def output(s: Served) -> dict[str, Any]:
        assert s.usage is not None
        return {
            "content": "a paragraph",
            "model": MODEL,
            "usage": {
                "prompt_tokens": s.usage[0],
                "completion_tokens": s.usage[1],
                "total_tokens": s.tokens,
            },
        }

    assert first["output"] == {"steps": {"draft": output(served[0]), "review": output(served[1])}}
    assert "step publish exceeded a budget" in first["error"], first
    assert second["output"] == {"steps": {"draft": output(served[2])}}
    assert "step review exceeded a budget" in second["error"], second
