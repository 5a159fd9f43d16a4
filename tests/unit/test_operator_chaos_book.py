"""The ChaosExperiment reconciler's probe book: one experiment never counts another's
answers, whatever their namespaces and names (probe ids name neither the namespace nor,
unambiguously, the experiment)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from troupe_operator.api.chaos import ChaosExperimentSpec, ChaosExperimentStatus, ChaosTargets
from troupe_operator.builders import chaos as builders
from troupe_operator.reconcilers import chaos

NOW = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)


class EventLog:
    """A fake operator's NATS: the answers it holds, by reply subject, and what was asked."""

    def __init__(self, held: dict[str, Any]) -> None:
        self.held = held
        self.asked: list[str] = []

    async def last_messages(self, _target: Any, _stream: str, subjects: Sequence[str]) -> Any:
        self.asked.extend(subjects)
        return {s: self.held[s] for s in subjects if s in self.held}


def operator(log: EventLog) -> Any:
    settings = SimpleNamespace(nats_url="nats://x:4222", nats_replicas=1)
    return SimpleNamespace(settings=settings, nats=log)


def running(agent: str) -> tuple[ChaosExperimentSpec, ChaosExperimentStatus]:
    spec = ChaosExperimentSpec.model_validate({"selector": {"agents": {}}, "duration": "10s"})
    status = builders.advance(
        ChaosExperimentStatus(), spec, 1, NOW, NOW, True, ChaosTargets(agents=[agent])
    )
    return spec, status.model_copy(update={"probe_rounds": 1})


def answers(
    book: chaos.ProbeBook, log: EventLog, namespace: str, name: str, agent: str
) -> list[builders.Answer]:
    spec, status = running(agent)
    return asyncio.run(chaos._answers(operator(log), book, namespace, name, spec, status, NOW))


def answered_once(book: chaos.ProbeBook, namespace: str, name: str, agent: str) -> None:
    """The first experiment's probe is answered on its own event log and read into the book."""
    _, status = running(agent)
    probe = builders.probe_id(name, status.run, agent, 0)
    subject = builders.probe_reply_subject(namespace, name, probe)
    held = {subject: SimpleNamespace(headers={}, time=NOW + timedelta(milliseconds=5))}
    assert len(answers(book, EventLog(held), namespace, name, agent)) == 1


def test_the_same_experiment_name_in_another_namespace_reads_its_own_answers() -> None:
    book = chaos.ProbeBook()
    answered_once(book, "team-a", "latency", "echo")
    log = EventLog({})
    assert answers(book, log, "team-b", "latency", "echo") == []
    assert len(log.asked) == 1  # its probe was looked up on its own event log


def test_an_experiment_whose_name_extends_another_with_its_run_counts_nothing_of_it() -> None:
    # Probe ids of experiment "x-once" (run "once") begin "chaos-x-once-": experiment "x"'s
    # run "once" prefix.
    book = chaos.ProbeBook()
    answered_once(book, "team", "x-once", "once-echo")
    assert answers(book, EventLog({}), "team", "x", "echo") == []


names = st.from_regex(r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@given(first=st.tuples(names, names, names), second=st.tuples(names, names, names))
def test_no_experiment_counts_the_answers_of_another(
    first: tuple[str, str, str], second: tuple[str, str, str]
) -> None:
    if first[:2] == second[:2]:
        return
    book = chaos.ProbeBook()
    answered_once(book, *first)
    assert answers(book, EventLog({}), *second) == []


class Experiments:
    """A fake API server's ChaosExperiments: counts the listings."""

    def __init__(self, listed: list[dict[str, Any]]) -> None:
        self.listed = listed
        self.listings = 0

    async def list_watched(self, _plural: str, _namespaces: Any) -> list[dict[str, Any]]:
        self.listings += 1
        return self.listed


def test_a_tick_with_no_run_in_progress_lists_nothing_until_the_rescan() -> None:
    kube = Experiments([])
    quiet: Any = SimpleNamespace(kube=kube, settings=SimpleNamespace(namespaces=()))
    book = chaos.ProbeBook()
    asyncio.run(chaos.chaos_once(quiet, book, rescan=False))
    assert kube.listings == 0
    asyncio.run(chaos.chaos_once(quiet, book, rescan=True))
    assert kube.listings == 1


def test_a_run_in_progress_is_listed_every_tick_until_its_experiment_is_gone() -> None:
    kube = Experiments([])  # deleted: the listing no longer has it
    quiet: Any = SimpleNamespace(kube=kube, settings=SimpleNamespace(namespaces=()))
    book = chaos.ProbeBook(running={("team", "latency")})
    asyncio.run(chaos.chaos_once(quiet, book, rescan=False))
    assert kube.listings == 1
    assert book.running == set()
    asyncio.run(chaos.chaos_once(quiet, book, rescan=False))
    assert kube.listings == 1


class NoFaults:
    async def read_key(self, _target: Any, _bucket: str, _key: str) -> bytes | None:
        return None


def test_a_deleted_experiment_leaves_nothing_in_the_book() -> None:
    book = chaos.ProbeBook(running={("team", "latency")})
    answered_once(book, "team", "latency", "echo")
    answered_once(book, "team", "other", "echo")
    deleted: Any = SimpleNamespace(
        settings=SimpleNamespace(nats_url="nats://x:4222"),
        nats=NoFaults(),
        lock=lambda *_: asyncio.Lock(),
    )
    body = {"metadata": {"namespace": "team", "name": "latency"}}
    asyncio.run(chaos.forget(deleted, body, book))
    assert set(book.answers) == {("team", "other", "once")}
    assert book.running == set()
