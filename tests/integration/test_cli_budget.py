"""``troupe budget ls`` and ``troupe budget show`` on a real nats-server: the definitions
are written to the namespace's budget bucket as the operator writes them, the ledgers by
the runtime's own ``BudgetGuard`` (holds taken, committed, one left in flight, one
refused), and the CLI prints what they hold."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext

from troupe_cli.main import amain
from troupe_runtime.contract import naming
from troupe_runtime.contract.budget import (
    Amount,
    BudgetDefinition,
    BudgetExceeded,
    SpendContext,
)
from troupe_runtime.nats.provision import budget_bucket_config
from troupe_runtime.state.budgets import BudgetGuard, Definitions

Output = tuple[int, str, str]


async def troupe(capsys: pytest.CaptureFixture[str], nats_url: str, ns: str, *args: str) -> Output:
    code = await amain(["--nats-url", nats_url, "-n", ns, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


def definition(name: str, **fields: Any) -> BudgetDefinition:
    return BudgetDefinition.model_validate({"name": name, "generation": 1, **fields})


DAILY = definition(
    "team",
    scope="Namespace",
    window={"type": "Day"},
    limits={"tokens": {"soft": 800, "hard": 1000}, "costUsd": {"hard": 1.0}},
)
PER_RUN = definition(
    "per-run",
    scope="Workflow",
    workflow="research",
    window={"type": "Run"},
    limits={"tokens": {"hard": 5000}},
)


async def write_definitions(js: JetStreamContext, ns: str, *definitions: BudgetDefinition) -> None:
    """What the operator writes: one ``def.<budget>`` per Budget."""
    kv = await js.create_key_value(config=budget_bucket_config(ns))
    for each in definitions:
        await kv.put(
            naming.budget_definition_key(each.name), each.model_dump_json(by_alias=True).encode()
        )


def spend(hold: str, run: str | None = None, workflow: str | None = None) -> SpendContext:
    return SpendContext(agent="writer", workflow=workflow, run=run, hold_id=hold)


async def spend_as_the_runtime(js: JetStreamContext, ns: str) -> None:
    """Two calls committed, one still in flight, one refused by the daily hard limit; two
    runs of the workflow, each its own Run window."""
    definitions = Definitions(ns)
    await definitions.start(js)
    try:
        guard = BudgetGuard(ns, definitions)
        guard.use(js)
        first = await guard.reserve(spend("h1"), Amount(tokens=300, cost_usd=0.03))
        await first.commit(Amount(tokens=250, cost_usd=0.025))
        second = await guard.reserve(spend("h2"), Amount(tokens=300, cost_usd=0.03))
        await second.commit(Amount(tokens=150, cost_usd=0.015))
        await guard.reserve(spend("h3"), Amount(tokens=200, cost_usd=0.02))  # in flight
        with pytest.raises(BudgetExceeded):
            await guard.reserve(spend("h4"), Amount(tokens=500, cost_usd=0.05))
        # Runs of the workflow count against both budgets: the namespace's has room for
        # 1000 - 400 - 200 = 400 tokens more.
        run_a = await guard.reserve(spend("r1", "run-a", "research"), Amount(tokens=100))
        await run_a.commit(Amount(tokens=100))
        run_b = await guard.reserve(spend("r2", "run-b", "research"), Amount(tokens=150))
        await run_b.commit(Amount(tokens=120))
        await guard.settled()  # a commit is written after it returns
    finally:
        await definitions.stop()


async def test_budget_ls_and_show_print_what_the_ledgers_hold(
    capsys: pytest.CaptureFixture[str], nats_url: str, js: JetStreamContext
) -> None:
    ns = f"b{uuid.uuid4().hex[:10]}"
    await write_definitions(js, ns, DAILY, PER_RUN)
    await spend_as_the_runtime(js, ns)

    code, out, err = await troupe(capsys, nats_url, ns, "budget", "ls", "-o", "json")
    assert (code, err) == (0, "")
    listed = {entry["name"]: entry for entry in json.loads(out)}
    assert sorted(listed) == ["per-run", "team"]
    team = listed["team"]
    assert team["scope"] == {"type": "Namespace", "agents": None, "workflow": None}
    assert team["currentWindow"] == time.strftime("d%Y%m%d", time.gmtime())
    assert team["spent"]["tokens"] == 250 + 150 + 100 + 120
    assert team["spent"]["costUsd"] == pytest.approx(0.04)
    assert team["reserved"] == {"tokens": 200, "costUsd": pytest.approx(0.02)}
    assert team["remaining"]["tokens"] == 1000 - 620 - 200
    assert team["remaining"]["costUsd"] == pytest.approx(1.0 - 0.04 - 0.02)
    assert team["refusals"] == 1
    assert team["burnRate"]["tokensPerHour"] > 0
    assert team["runs"] is None
    per_run = listed["per-run"]
    assert per_run["currentWindow"] == "runs"
    assert per_run["spent"] == {"tokens": 220, "costUsd": 0.0}
    assert per_run["runs"] == {
        "tracked": 2,
        "exceeded": 0,
        "largest": {"tokens": 120, "costUsd": 0.0},
    }
    assert per_run["remaining"]["tokens"] == 5000 - 120  # the run closest to its limit

    code, out, err = await troupe(capsys, nats_url, ns, "budget", "ls")
    assert (code, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["NAME", "SCOPE", "WINDOW", "TOKENS"]
    team_row = next(row for row in rows if row.startswith("team"))
    assert "Namespace" in team_row
    assert "620" in team_row
    assert "1,000" in team_row
    assert "Workflow research" in next(row for row in rows if row.startswith("per-run"))

    code, out, err = await troupe(capsys, nats_url, ns, "budget", "show", "team")
    assert (code, err) == (0, "")
    assert "spent:       620 tokens, $0.04" in out
    assert "reserved:    200 tokens, $0.02" in out
    assert "remaining:   180 / $0.94" in out
    assert "refused:     1" in out

    code, out, err = await troupe(capsys, nats_url, ns, "budget", "show", "per-run", "-o", "json")
    assert (code, err) == (0, "")
    shown = json.loads(out)
    assert [w["spent"]["tokens"] for w in shown["windows"]] == [120, 100]  # largest first
    assert all(w["window"].startswith("run-") for w in shown["windows"])


async def test_junk_in_the_bucket_is_warned_of_and_the_rest_still_shown(
    capsys: pytest.CaptureFixture[str], nats_url: str, js: JetStreamContext
) -> None:
    ns = f"b{uuid.uuid4().hex[:10]}"
    await write_definitions(js, ns, DAILY)
    kv = await js.key_value(naming.budget_bucket(ns))
    await kv.put(naming.budget_definition_key("broken"), b"{not json")
    await kv.put(naming.budget_ledger_key("team", "d20260101"), b'{"window": 3}')
    code, out, err = await troupe(capsys, nats_url, ns, "budget", "ls", "-o", "json")
    assert code == 0
    assert [entry["name"] for entry in json.loads(out)] == ["team"]
    assert json.loads(out)[0]["spent"] == {"tokens": 0, "costUsd": 0.0}
    assert "def.broken" in err
    assert "ledger.team.d20260101" in err


async def test_a_namespace_without_budgets_lists_none_and_shows_an_error(
    capsys: pytest.CaptureFixture[str], nats_url: str
) -> None:
    ns = f"b{uuid.uuid4().hex[:10]}"
    assert await troupe(capsys, nats_url, ns, "budget", "ls") == (0, "no budgets\n", "")
    code, out, err = await troupe(capsys, nats_url, ns, "budget", "show", "team")
    assert (code, out) == (1, "")
    assert f"namespace {ns} has no Budget team" in err
