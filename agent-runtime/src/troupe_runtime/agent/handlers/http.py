"""The ``http`` handler: POST the event to a URL, publish the response.

The event goes as a binary-mode CloudEvent over HTTP (``ce-*`` headers, the
data as the body), so the endpoint, often a sidecar written in any language,
needs no CloudEvents library to read it. A 2xx body becomes the output; an
empty body (204) means no output; any other status fails the attempt.
"""

from __future__ import annotations

from typing import Any

import httpx

from troupe_runtime.agent.context import Context
from troupe_runtime.contract.envelope import CONTENT_TYPE_HEADER, is_json, to_binary


class HttpError(Exception):
    """The endpoint answered with a status other than 2xx."""


class HttpHandler:
    def __init__(self, url: str, client: httpx.AsyncClient) -> None:
        self._url = url
        self._client = client

    async def __call__(self, ctx: Context) -> Any:
        headers, body = to_binary(ctx.event)
        response = await self._client.post(self._url, content=body, headers=headers)
        if not response.is_success:
            raise HttpError(
                f"POST {self._url} answered {response.status_code}: {response.text[:200]}"
            )
        if not response.content:
            return None
        if is_json(response.headers.get(CONTENT_TYPE_HEADER)):
            return response.json()
        return response.content
