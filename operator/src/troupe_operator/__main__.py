"""Entry point: ``python -m troupe_operator`` runs the operator under kopf."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random

import kopf

from troupe_operator import __version__, handlers, settings


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
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument(
        "--standalone", action="store_true", help="run without peering (a single replica)"
    )
    peering.add_argument(
        "--peering",
        metavar="NAME",
        help="kopf peering object for active/standby replicas (needs kopf's peering CRDs)",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority (default with --peering: a random one per process)",
    )
    parser.add_argument("--nats-url", help="NATS for agents that name none (TROUPE_NATS_URL)")
    parser.add_argument("--log-format", choices=["plain", "json"], help="(TROUPE_LOG_FORMAT)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def peering_priority(peering: str | None, given: int | None) -> int:
    """Draw a peering priority: kopf pauses every peer when several share the top one,
    and a Deployment cannot give its replicas different flags, so each process draws."""
    if given is not None:
        return given
    if peering is None:
        return 0
    return random.SystemRandom().randrange(1, 2**31)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = settings.from_environment().with_namespaces(args.namespace, args.all_namespaces)
    if args.nats_url:
        config = dataclasses.replace(config, nats_url=args.nats_url)
    if args.log_format:
        config = dataclasses.replace(config, log_format=args.log_format)
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if config.log_format == "json" else kopf.LogFormat.PLAIN,
    )
    registry = kopf.OperatorRegistry()
    handlers.register(registry)
    asyncio.run(
        kopf.operator(
            registry=registry,
            memo=handlers.new_memo(config),
            standalone=True if args.standalone else None,
            peering_name=args.peering,
            priority=peering_priority(args.peering, args.priority),
            clusterwide=config.all_namespaces,
            namespaces=config.namespaces,
            liveness_endpoint=(
                f"http://{config.bind_address}:{config.health_port}/healthz"
                if config.health_port
                else None
            ),
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
