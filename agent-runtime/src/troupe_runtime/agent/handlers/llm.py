"""The ``llm`` handler: an OpenAI-compatible ``/chat/completions`` call through httpx.

The operator maps the Agent's Secret to these environment variables:
``TROUPE_LLM_BASE_URL`` (e.g. ``https://api.openai.com/v1``), ``TROUPE_LLM_API_KEY``
and ``TROUPE_LLM_MODEL`` (``handler.model`` in the Agent wins over it).

Input data: a string (sent as the user message), an object with ``messages``
(sent as the request body, with the model filled in), or anything else (sent
as JSON in the user message). Output data: ``{"content", "model", "usage"}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from troupe_runtime.agent.context import Context
from troupe_runtime.contract.llm import API_KEY_ENV, BASE_URL_ENV, MODEL_ENV


class LlmError(Exception):
    """The completion endpoint failed or answered something that is not a completion."""


@dataclass(frozen=True)
class LlmSettings:
    base_url: str
    api_key: str
    model: str

    @classmethod
    def from_env(cls, env: Mapping[str, str], model: str | None = None) -> LlmSettings:
        missing = [name for name in (BASE_URL_ENV, API_KEY_ENV) if not env.get(name)]
        chosen = model or env.get(MODEL_ENV)
        if chosen is None:
            missing.append(MODEL_ENV)
        if missing or chosen is None:
            raise ValueError(
                f"handler type llm needs {', '.join(missing)}: set them from the Agent's "
                "Secret (keys baseUrl, apiKey, model) or set handler.model"
            )
        return cls(base_url=env[BASE_URL_ENV].rstrip("/"), api_key=env[API_KEY_ENV], model=chosen)


def build_request(data: Any, model: str) -> dict[str, Any]:
    if isinstance(data, dict) and "messages" in data:
        return {**data, "model": model}
    content = data if isinstance(data, str) else json.dumps(data)
    return {"model": model, "messages": [{"role": "user", "content": content}]}


class LlmHandler:
    def __init__(self, settings: LlmSettings, client: httpx.AsyncClient) -> None:
        self._settings = settings
        self._client = client

    async def __call__(self, ctx: Context) -> Any:
        response = await self._client.post(
            f"{self._settings.base_url}/chat/completions",
            json=build_request(ctx.event.data, self._settings.model),
            headers={"Authorization": f"Bearer {self._settings.api_key}"},
        )
        if not response.is_success:
            raise LlmError(f"completion answered {response.status_code}: {response.text[:200]}")
        body = response.json()
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as error:
            raise LlmError(f"chat completion without choices[0].message: {body!r:.200}") from error
        return {"content": content, "model": body.get("model"), "usage": body.get("usage")}
