"""Entry point: ``python -m troupe_operator`` runs the operator under kopf.

Replicas elect the active one through a coordination.k8s.io/v1 Lease (``clients.lease``,
client-go's rules). A standby starts nothing that writes, neither kopf nor the resync,
until it holds the Lease; meanwhile it answers /healthz (so Kubernetes leaves it running)
and /readyz (while it can reach the API server, to take over). The holder renews the Lease
and exits at once when it cannot renew in time (crash-only: two replicas never act); on
SIGTERM it stops kopf and releases the Lease, so a standby takes over on its next try.
``--standalone`` runs without election: one replica on its own, or the test harness.

kopf's peering is not used, because one mechanism is better than two and peering was the
weaker one: it pauses only the watch streams, so a paused replica still ran the startup
handlers and the resync; it records peers with a 60 s lifetime, so a killed one counted as
alive for up to a minute; and peers act until they see each other, so both acted at start.
A Lease written at a resourceVersion has one holder by construction, needs no CRDs, and is
what Kubernetes' own controllers use.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Awaitable
from typing import Any

import kopf
from aiohttp import web

from troupe_operator import __version__, handlers, metrics, settings
from troupe_operator.clients.kube import new_api_client
from troupe_operator.clients.lease import LeaderElector, LeaseLock, preload_api_classes

EXIT_LEASE_LOST = 3
"""The exit status of a holder that lost the Lease: Kubernetes restarts it as a standby."""
logger = logging.getLogger("troupe_operator.election")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="troupe_operator",
        description="Troupe operator: reconciles troupe.dev Agents and Workflows. Settings come"
        " from TROUPE_* environment variables (see troupe_operator.settings); flags win.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        help="watch this namespace (repeatable; default: TROUPE_WATCH_NAMESPACES, else all)",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="run without leader election: only ever one replica",
    )
    election = parser.add_argument_group("leader election (unless --standalone)")
    election.add_argument("--lease-name", help="the Lease replicas share (TROUPE_LEASE_NAME)")
    election.add_argument(
        "--lease-namespace", help="its namespace (TROUPE_LEASE_NAMESPACE, else POD_NAMESPACE)"
    )
    election.add_argument(
        "--lease-duration",
        type=int,
        metavar="SECONDS",
        help="how long a standby waits on a holder that stopped renewing (TROUPE_LEASE_DURATION)",
    )
    election.add_argument(
        "--renew-deadline",
        type=float,
        metavar="SECONDS",
        help="how long the holder may fail to renew before it exits (TROUPE_RENEW_DEADLINE)",
    )
    election.add_argument(
        "--retry-period",
        type=float,
        metavar="SECONDS",
        help="the pause between tries to acquire or renew (TROUPE_RETRY_PERIOD)",
    )
    parser.add_argument("--nats-url", help="NATS for agents that name none (TROUPE_NATS_URL)")
    parser.add_argument("--log-format", choices=["plain", "json"], help="(TROUPE_LOG_FORMAT)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def configure(args: argparse.Namespace) -> settings.OperatorSettings:
    """The environment's settings with the flags applied; ``ValueError`` names a bad one."""
    config = settings.from_environment().with_namespaces(args.namespace, args.all_namespaces)
    flags = {
        "nats_url": args.nats_url,
        "log_format": args.log_format,
        "lease_name": args.lease_name,
        "lease_namespace": args.lease_namespace,
    }
    config = dataclasses.replace(config, **{k: v for k, v in flags.items() if v})
    timings = {
        "lease_duration": args.lease_duration,
        "renew_deadline": args.renew_deadline,
        "retry_period": args.retry_period,
    }
    election = dataclasses.replace(
        config.election, **{k: v for k, v in timings.items() if v is not None}
    )
    return dataclasses.replace(config, election=election)


def identity(pod_name: str) -> str:
    """The replica's name in the Lease, as client-go makes it: the pod (or host) name and a
    random part, so a restarted process never mistakes an old record for its own."""
    return f"{pod_name or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _kopf_settings(config: settings.OperatorSettings) -> dict[str, Any]:
    registry = kopf.OperatorRegistry()
    handlers.register(registry)
    return {
        "registry": registry,
        "memo": handlers.new_memo(config),
        "standalone": True,
        "clusterwide": config.all_namespaces,
        "namespaces": config.namespaces,
    }


async def run_standalone(config: settings.OperatorSettings) -> None:
    """Kopf on its own, as the only replica: it handles the signals and serves /healthz."""
    liveness = f"http://{config.bind_address}:{config.health_port}/healthz"
    await kopf.operator(
        **_kopf_settings(config), liveness_endpoint=liveness if config.health_port else None
    )


async def run_leading(config: settings.OperatorSettings, stop: asyncio.Event) -> None:
    """Kopf once the Lease is ours, until ``stop`` is set.

    kopf installs signal handlers of its own as it starts; ours are put back at once, so a
    signal at any moment sets ``stop``, and kopf stops on its stop flag (on its own signal
    flag it would wait 5 s for a task that waits on the stop flag).
    """
    loop = asyncio.get_running_loop()
    existing = asyncio.all_tasks()
    tasks = await kopf.spawn_tasks(**_kopf_settings(config), stop_flag=stop)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await kopf.run_tasks(tasks, ignored=existing)


async def serve_probes(
    config: settings.OperatorSettings, elector: LeaderElector, preloaded: asyncio.Future[None]
) -> web.AppRunner:
    """/healthz answers while the event loop does, leading or not (liveness); /readyz while
    this replica leads, or could take over at once: it has loaded what the handlers need and
    reaches the API server (readiness)."""

    def state() -> dict[str, object]:
        role = "leader" if elector.leading else "standby"
        return {"role": role, "identity": elector.identity, "holder": elector.holder}

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response(state())

    async def readyz(_: web.Request) -> web.Response:
        ready = elector.leading or (preloaded.done() and elector.in_contact())
        return web.json_response(state(), status=200 if ready else 503)

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    if config.health_port:
        await web.TCPSite(runner, config.bind_address, config.health_port).start()
    return runner


def exit_lost(reason: str) -> None:
    """Stop every write at once, from whichever thread noticed: crash-only, no cleanup."""
    logger.critical("%s: exiting, so that no two replicas act", reason)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_LEASE_LOST)


async def _until_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Await ``work`` unless ``stop`` is set first; whether it finished."""
    working = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({working, stopping}, return_when=asyncio.FIRST_COMPLETED)
    for task in (working, stopping):
        task.cancel()
    await asyncio.gather(working, stopping, return_exceptions=True)
    return not stop.is_set()


async def run_elected(config: settings.OperatorSettings, elector: LeaderElector) -> None:
    """Stand by until the Lease is ours, then run kopf until a signal; release on the way out."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    metrics.serve(config.metrics_port, config.bind_address)
    metrics.LEADER.set(0)
    preloading = loop.run_in_executor(None, preload_api_classes)
    probes = await serve_probes(config, elector, preloading)
    lease = f"{config.lease_namespace}/{config.lease_name}"
    try:
        logger.info("standing by for the lease %s as %s", lease, elector.identity)
        if not await _until_stopped(elector.acquire(), stop):
            logger.info("stopped while standing by")
            return
        elector.start_holding(exit_lost)
        if not await _until_stopped(preloading, stop):
            return
        metrics.LEADER.set(1)
        logger.info("leading through the lease %s: starting the handlers", lease)
        await run_leading(config, stop)
    finally:
        await loop.run_in_executor(None, elector.release)
        metrics.LEADER.set(0)
        await probes.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = configure(args)
    except ValueError as error:
        print(f"troupe_operator: {error}", file=sys.stderr)
        return 2
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if config.log_format == "json" else kopf.LogFormat.PLAIN,
    )
    if args.standalone:
        metrics.LEADER.set(1)
        asyncio.run(run_standalone(config))
        return 0
    lock = LeaseLock(new_api_client(), config.lease_namespace, config.lease_name)
    elector = LeaderElector(lock, identity(config.pod_name), config.election)
    asyncio.run(run_elected(config, elector))
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
