"""``python -m troupe_gateway``: settings, NATS, Kubernetes, then uvicorn until SIGTERM
(uvicorn finishes the requests in flight). Bad settings exit 2 with the sentence why."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import uvicorn

from troupe_gateway.app import build_app
from troupe_gateway.auth import KubernetesAuthorizer
from troupe_gateway.calls import Calls
from troupe_gateway.directory import Directory
from troupe_gateway.kube import Kube, KubeConfigError, environment_connection
from troupe_gateway.services import Services
from troupe_gateway.settings import Settings, SettingsError
from troupe_runtime.contract.agent_config import NatsSettings
from troupe_runtime.nats.connection import connect


async def serve(settings: Settings) -> None:
    kube = Kube(environment_connection(os.environ))
    credentials = os.environ.get("TROUPE_NATS_CREDENTIALS") or None
    nc = await connect(
        NatsSettings(
            url=settings.nats_url,
            credentials_file=Path(credentials) if credentials else None,
            replicas=settings.nats_replicas,
        ),
        "troupe-gateway",
    )
    js = nc.jetstream()
    directory = Directory(js)
    services = Services(
        nc=nc,
        js=js,
        calls=Calls(nc, js, settings.task_ttl_seconds),
        directory=directory,
        authorizer=KubernetesAuthorizer(kube),
        kube=kube,
        settings=settings,
    )
    config = uvicorn.Config(
        build_app(services),
        host=settings.host,
        port=settings.port,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
        log_level="info",
    )
    try:
        await uvicorn.Server(config).serve()
    finally:
        await directory.aclose()
        await nc.close()
        await kube.aclose()


def main() -> None:
    try:
        settings = Settings.from_env()
        asyncio.run(serve(settings))
    except (SettingsError, KubeConfigError) as error:
        print(f"troupe-gateway: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
