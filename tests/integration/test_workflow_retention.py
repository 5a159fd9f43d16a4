"""Retention of workflow data: maxAge on the stream and the runs bucket, maxRuns pruning
the oldest finished runs, and runs counted from the stream's subject index."""

from __future__ import annotations

import uuid

import nats
import pytest
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from tests.integration.test_workflow_engine import appender
from tests.integration.workflow_harness import (
    agents,
    engine,
    engine_config,
    new_namespace,
    result,
    run_events,
    trigger,
)
from troupe_operator.clients.nats import NatsPool, NatsTarget
from troupe_runtime.contract import naming
from troupe_runtime.contract.workflow_resources import build_workflow_resources
from troupe_runtime.nats.provision import ensure_workflow_resources


async def test_max_age_bounds_the_workflow_stream_and_the_runs_bucket(nats_url: str) -> None:
    config = engine_config(nats_url, new_namespace(), [{"name": "a"}], retention={"maxAge": "1h"})
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_workflow_resources(js, build_workflow_resources(config))
    stream = await js.stream_info(config.stream)
    bucket = await js.stream_info(naming.kv_stream(config.runs_bucket))
    await nc.close()
    assert (stream.config.max_age, bucket.config.max_age) == (3600.0, 3600.0)


async def test_max_runs_prunes_the_oldest_finished_runs_and_the_counts_follow(
    nats_url: str,
) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "a"}], retention={"maxRuns": 2})
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    runs = [uuid.uuid4().hex for _ in range(4)]
    async with agents(nats_url, ns, {"a": appender("a")}), engine(config):
        for run in runs:
            await trigger(js, config, [], run)
            await result(js, config, run)
        kept = [await run_events(js, config, run) for run in runs]
    kv = await js.key_value(config.runs_bucket)
    projections = [await _present(kv, run) for run in runs]
    pool = NatsPool()
    tally = await pool.runs(NatsTarget(nats_url), config)
    await pool.close()
    await nc.close()
    assert [bool(events) for events in kept] == [False, False, True, True]
    assert projections == [False, False, True, True]
    assert (tally.running, tally.succeeded, tally.failed) == (0, 2, 0)
    assert tally.last is not None
    assert tally.last.run_id == runs[-1]


@pytest.mark.parametrize("runs", [0, 3])
async def test_runs_are_counted_without_reading_them(nats_url: str, runs: int) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "a"}])
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    ids = [uuid.uuid4().hex for _ in range(runs)]
    async with agents(nats_url, ns, {"a": appender("a")}), engine(config):
        for run in ids:
            await trigger(js, config, [], run)
            await result(js, config, run)
    pool = NatsPool()
    tally = await pool.runs(NatsTarget(nats_url), config)
    await pool.close()
    await nc.close()
    assert (tally.running, tally.succeeded, tally.failed) == (0, runs, 0)
    assert (tally.last.run_id if tally.last else None) == (ids[-1] if ids else None)


async def _present(kv: KeyValue, run: str) -> bool:
    try:
        await kv.get(run)
    except KeyNotFoundError:
        return False
    return True
