"""The node's only door to the API server: plain JSON dicts in and out.

The generated client's models validate and convert eagerly and are untyped;
the node handles every object as the API's own camelCase JSON, so it borrows
only the client's transport (kubeconfig, TLS, auth) and parses JSON itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kubernetes import client, config
from urllib3.exceptions import HTTPError

JSON = dict[str, Any]

STRATEGIC_MERGE = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
REQUEST_TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 10.0
# Threads (one per pod) share the client; a small pool would churn connections.
CONNECTION_POOL_SIZE = 64


class ApiError(Exception):
    """The API server answered with a non-2xx status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


# What an unreachable or unhappy API server raises: worth a log line and a
# retry, not a traceback.
EXPECTED_ERRORS = (ApiError, OSError, HTTPError)


def _message(data: bytes) -> str:
    try:
        body = json.loads(data)
    except ValueError:
        return data.decode(errors="replace")
    if isinstance(body, dict):
        return str(body.get("message", body))
    return str(body)


class Kube:
    """A thread-safe JSON client for the few API calls the node makes."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self._client = api_client

    @classmethod
    def from_kubeconfig(cls, path: Path) -> Kube:
        configuration = client.Configuration()
        configuration.connection_pool_maxsize = CONNECTION_POOL_SIZE
        api_client: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(path), client_configuration=configuration
        )
        return cls(api_client)

    @property
    def server(self) -> str:
        """The API server's URL, as the kubeconfig gives it."""
        return str(self._client.configuration.host)

    def _send(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: JSON | None,
        content_type: str,
        timeout: float | tuple[float, float],
    ) -> Any:
        params = self._client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query.items()) if query else None,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        return self._client.call_api(*params, _request_timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: JSON | None = None,
        content_type: str = "application/json",
    ) -> JSON:
        """Send one request and return the decoded response; raise ApiError on non-2xx."""
        response = self._send(method, path, query, body, content_type, REQUEST_TIMEOUT_SECONDS)
        data: bytes = response.read()
        if not 200 <= response.status <= 299:
            raise ApiError(response.status, _message(data))
        decoded: JSON = json.loads(data) if data else {}
        return decoded

    def get(self, path: str, query: Mapping[str, str] | None = None) -> JSON:
        return self.request("GET", path, query=query)

    def get_or_none(self, path: str) -> JSON | None:
        """The object at ``path``, or None when it does not exist."""
        try:
            return self.get(path)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def watch(self, path: str, query: Mapping[str, str], timeout_seconds: int) -> Iterator[JSON]:
        """Yield the watch events of ``path`` until the server ends the stream."""
        watch_query = {**query, "watch": "true", "timeoutSeconds": str(timeout_seconds)}
        # The read timeout outlives the server-side one so a dead connection still ends.
        timeout = (CONNECT_TIMEOUT_SECONDS, timeout_seconds + 30.0)
        response = self._send("GET", path, watch_query, None, "application/json", timeout)
        raw = response.response
        try:
            if not 200 <= response.status <= 299:
                raise ApiError(response.status, _message(response.read()))
            buffer = b""
            for chunk in raw.stream(amt=None, decode_content=False):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        event: JSON = json.loads(line)
                        yield event
        finally:
            raw.release_conn()
