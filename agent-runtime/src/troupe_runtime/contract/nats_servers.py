"""A NATS URL names one server or, comma-separated, every server of a cluster.

nats-py takes a list of servers and fails over between them, and a JetStream cluster keeps
serving while a majority of its servers run; but a client given only one URL cannot reach
the others when that one is down (it learns of them only from the server it reached). So
wherever Troupe accepts a NATS URL (the operator's ``TROUPE_NATS_URL``, an Agent's or a
Workflow's ``spec.nats.url``, the gateway, the CLI's ``--nats-url``) it accepts a list,
``nats://a:4222,nats://b:4222,nats://c:4222``, and every client is given all of it.

``replicas`` (1 to ``MAX_REPLICAS``) is how many servers store each stream and bucket: 1 on a
single server (a server refuses more), 3 on a three-server cluster so that losing one loses
nothing. JetStream caps it at 5.
"""

from __future__ import annotations

import re

SCHEMES = ("nats", "tls", "ws", "wss")
_ONE = r"(nats|tls|ws|wss)://[\x21-\x2b\x2d-\x7e]+"
NATS_URLS_PATTERN = f"^{_ONE}(,{_ONE})*$"
"""One server URL or several, comma-separated: printable ASCII, no whitespace, no empty
entry, each with a scheme nats-py speaks."""
MAX_REPLICAS = 5
"""JetStream's own limit on a stream's replicas."""


class InvalidNatsUrl(ValueError):
    """A NATS URL (list) that is not one or more comma-separated server URLs."""


def server_urls(url: str) -> list[str]:
    """The servers of a NATS URL, in order; blanks around the commas are dropped.

    Schemes are not mixed (nats-py refuses a list of both ``nats``/``tls`` and ``ws``/``wss``
    servers)."""
    servers = [part.strip() for part in url.split(",")]
    for server in servers:
        if not re.fullmatch(_ONE, server):
            raise InvalidNatsUrl(
                f"{server!r} in NATS URL {url!r} is not a server URL such as "
                "nats://host:4222 (several are separated by commas)"
            )
    websocket = {server.startswith("ws") for server in servers}
    if len(websocket) > 1:
        raise InvalidNatsUrl(
            f"NATS URL {url!r} mixes websocket (ws, wss) and plain (nats, tls) servers"
        )
    return servers
