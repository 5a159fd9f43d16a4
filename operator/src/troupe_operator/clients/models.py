"""The only module that talks to model endpoints: the ModelProvider probe.

``GET {baseUrl}/models`` with the key as a Bearer token and the provider's headers, a short
timeout, no redirects followed (a redirect would carry the key elsewhere) and a bounded read.
What it returns for people is an HTTP status or an exception's kind: never a response body
(it may echo the key) nor a header.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import httpx

from troupe_operator.builders.model_provider import Probe
from troupe_runtime.contract.redact import HIDDEN, redact

PROBE_TIMEOUT = httpx.Timeout(5.0, connect=3.0)
MAX_BODY_BYTES = 4 * 1024 * 1024
"""A model list longer than this is not one (a hosted provider's is some 100 KiB)."""
UNAUTHORIZED_STATUSES = frozenset({401, 403})


def _scrubbed(text: str, secret: str | None) -> str:
    text = redact(text)
    return text.replace(secret, HIDDEN) if secret else text


def _models(body: bytes) -> tuple[str, ...] | None:
    """The ids of an OpenAI model list (``{"data": [{"id": ...}]}``), or None."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return None
    ids = [item.get("id") for item in data if isinstance(item, dict)]
    if not all(isinstance(found, str) for found in ids):
        return None
    return tuple(str(found) for found in ids)


async def _body(response: httpx.Response) -> bytes | None:
    """The body, or None when it passes ``MAX_BODY_BYTES``."""
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def probe(url: str, api_key: str | None, headers: Mapping[str, str]) -> Probe:
    """Ask the endpoint at ``url`` (``…/models``) for its models."""
    sent = {**headers, "Accept": "application/json"}
    if api_key:
        sent["Authorization"] = f"Bearer {api_key}"
    try:
        async with (
            httpx.AsyncClient(timeout=PROBE_TIMEOUT, follow_redirects=False) as client,
            client.stream("GET", url, headers=sent) as response,
        ):
            status = response.status_code
            if status in UNAUTHORIZED_STATUSES:
                return Probe("unauthorized", f"HTTP {status}")
            if status >= 500 or status == 429:
                return Probe("unreachable", f"answered HTTP {status}")
            if status != 200:
                return Probe("invalid", f"answered HTTP {status}")
            body = await _body(response)
    except httpx.InvalidURL:
        return Probe("invalid", "is not a URL httpx can request")
    except httpx.TimeoutException:
        return Probe("unreachable", f"no answer within {PROBE_TIMEOUT.read:.0f}s")
    except (httpx.HTTPError, OSError) as error:
        said = _scrubbed(str(error), api_key) or type(error).__name__
        return Probe("unreachable", f"{type(error).__name__}: {said}")
    if body is None:
        return Probe("invalid", f"answered more than {MAX_BODY_BYTES} bytes")
    models = _models(body)
    if models is None:
        return Probe("invalid", "answered HTTP 200")
    return Probe("listed", models=models)
