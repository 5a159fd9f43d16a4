"""The environment the operator gives an ``llm`` handler, from the Secret the Agent names.

Each variable is filled from one key of that Secret; the model key is optional,
since ``handler.model`` in the Agent wins over it.
"""

from __future__ import annotations

BASE_URL_ENV = "TROUPE_LLM_BASE_URL"
API_KEY_ENV = "TROUPE_LLM_API_KEY"
MODEL_ENV = "TROUPE_LLM_MODEL"

# (environment variable, Secret key, optional)
SECRET_KEYS: tuple[tuple[str, str, bool], ...] = (
    (BASE_URL_ENV, "baseUrl", False),
    (API_KEY_ENV, "apiKey", False),
    (MODEL_ENV, "model", True),
)
