"""The process node's kubelet endpoint: the container logs ``kubectl logs`` asks for.

For ``pods/log`` the API server calls the pod's node at its advertised
address and ``daemonEndpoints.kubeletEndpoint.Port`` with
``GET /containerLogs/<namespace>/<pod>/<container>?<options>``, as it calls a
real kubelet's port 10250; this serves that call, and ``/healthz``.

Security is the kubelet's, so the API server's flags are the real ones:

- TLS with a serving certificate the cluster's CA signed for the node's
  address, which the API server checks (``--kubelet-certificate-authority``).
- Authentication by a client certificate signed by that CA; without one the
  answer is 401, and a certificate from another CA fails the handshake. The
  user is the certificate's CN and its groups are its Os, as the kubelet's
  x509 authenticator takes them.
- Authorization by a SubjectAccessReview for ``get nodes/proxy`` on this
  node, as the kubelet's webhook authorizer asks for ``/containerLogs``
  (403 when refused), cached as long as the kubelet caches (5 min allowed,
  30 s refused).

Options: ``tailLines``, ``limitBytes``, ``timestamps``, ``sinceSeconds``,
``sinceTime``, ``previous`` and ``follow``, streamed with chunked encoding
until the container instance ends or the client goes away.
"""

from __future__ import annotations

import logging
import select
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from troupe_devcluster.processnode import logs
from troupe_devcluster.processnode.kube import EXPECTED_ERRORS, Kube
from troupe_devcluster.processnode.runtime import LogSource, LogUnavailable

log = logging.getLogger(__name__)

HANDSHAKE_SECONDS = 10.0
# Bounds a write to a client that stopped reading; a follow stream is otherwise open-ended.
SOCKET_TIMEOUT_SECONDS = 60.0
ALLOWED_TTL_SECONDS = 300.0
DENIED_TTL_SECONDS = 30.0
AUTHENTICATED_GROUP = "system:authenticated"


class LogLookup(Protocol):
    def container_log(
        self, namespace: str, name: str, container: str, previous: bool
    ) -> LogSource: ...


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...]


def certificate_user(peer: dict[str, Any] | None) -> User | None:
    """The user a verified client certificate names (CN, Os), or None without one."""
    if not peer:
        return None
    name = ""
    groups: list[str] = []
    for attributes in peer.get("subject") or ():
        for key, value in attributes:
            if key == "commonName":
                name = str(value)
            elif key == "organizationName":
                groups.append(str(value))
    return User(name, tuple(groups)) if name else None


class Authorizer:
    """Asks the API server whether a user may read this node's logs, and remembers."""

    def __init__(self, kube: Kube, node_name: str) -> None:
        self._kube = kube
        self._node_name = node_name
        self._lock = threading.Lock()
        self._cache: dict[User, tuple[bool, float]] = {}

    def allowed(self, user: User) -> bool:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(user)
        if cached is not None and now < cached[1]:
            return cached[0]
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user.name,
                "groups": [*user.groups, AUTHENTICATED_GROUP],
                "resourceAttributes": {
                    "verb": "get",
                    "resource": "nodes",
                    "subresource": "proxy",
                    "name": self._node_name,
                },
            },
        }
        answer = self._kube.request(
            "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", body=review
        )
        allowed = bool((answer.get("status") or {}).get("allowed"))
        ttl = ALLOWED_TTL_SECONDS if allowed else DENIED_TTL_SECONDS
        with self._lock:
            self._cache[user] = (allowed, now + ttl)
        return allowed


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    lookup: LogLookup
    authorize: Callable[[User], bool]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Refused handshakes and clients that hang up are routine, not tracebacks.
        log.debug("kubelet endpoint: request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_SECONDS

    def setup(self) -> None:
        self.request.settimeout(HANDSHAKE_SECONDS)
        self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("kubelet endpoint: " + format, *args)

    def _plain(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.close_connection = True
        user = certificate_user(self.connection.getpeercert())
        if user is None:
            self._plain(401, "Unauthorized")
            return
        try:
            allowed = self.server.authorize(user)
        except EXPECTED_ERRORS as error:
            self._plain(500, f"cannot authorize {user.name}: {error}")
            return
        if not allowed:
            self._plain(
                403,
                f"Forbidden (user={user.name}, verb=get, resource=nodes, subresource(s)=[proxy])",
            )
            return
        url = urlsplit(self.path)
        parts = [unquote(part) for part in url.path.split("/")]
        if url.path == "/healthz":
            self._plain(200, "ok")
        elif len(parts) == 5 and parts[:2] == ["", "containerLogs"] and all(parts[2:]):
            query = {key: values[0] for key, values in parse_qs(url.query).items()}
            self._container_logs(parts[2], parts[3], parts[4], query)
        else:
            self._plain(404, "404 page not found")

    def _container_logs(
        self, namespace: str, pod: str, container: str, query: dict[str, str]
    ) -> None:
        try:
            options = logs.parse_options(query, time.time())
            source = self.server.lookup.container_log(namespace, pod, container, options.previous)
        except logs.OptionError as error:
            self._plain(400, str(error))
            return
        except LookupError as error:
            self._plain(404, str(error))
            return
        except LogUnavailable as error:
            self._plain(400, str(error))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def write(data: bytes) -> None:
            if data:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

        def finished() -> bool:
            return source.finished() or self._client_gone()

        logs.read_log(source.path, options, write, finished)
        self.wfile.write(b"0\r\n\r\n")

    def _client_gone(self) -> bool:
        """Whether the client closed its side: after its request it has nothing to send."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        return bool(readable)


class KubeletServer:
    """The HTTPS server, in a thread of its own, one thread per request."""

    def __init__(
        self,
        address: tuple[str, int],
        cert: Path,
        key: Path,
        client_ca: Path,
        lookup: LogLookup,
        authorize: Callable[[User], bool],
    ) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        context.load_verify_locations(str(client_ca))
        # Optional, so a client without a certificate hears 401 as from a kubelet.
        context.verify_mode = ssl.CERT_OPTIONAL
        context.set_alpn_protocols(["http/1.1"])
        self._server = _Server(address, _Handler)
        self._server.lookup = lookup
        self._server.authorize = authorize
        self._server.socket = context.wrap_socket(
            self._server.socket, server_side=True, do_handshake_on_connect=False
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="kubelet-endpoint", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
