"""Reading a pod's config file, with one sentence for whatever is wrong with it.

The runtime and the engine read their config from the file the operator mounts
(``pod.CONFIG_PATH``); a config they cannot use makes them log that sentence as one line
and exit non-zero, so that the pod's termination message (``FallbackToLogsOnError``)
says why, not a traceback's last frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from troupe_runtime.contract import pod

MAX_ERRORS = 3
"""Validation errors named in the sentence; the rest are counted."""

Config = TypeVar("Config", bound=BaseModel)


class InvalidConfig(Exception):
    """The config cannot be used; the message says why and where, on one line."""


def config_path(argument: Path | None, env: Mapping[str, str]) -> Path:
    """``--config`` first, then ``$TROUPE_CONFIG``, then the mounted ConfigMap's file."""
    if argument is not None:
        return argument
    return Path(env.get(pod.CONFIG_PATH_ENV) or pod.CONFIG_PATH)


def read_config(model: type[Config], path: Path) -> Config:
    """The config in ``path``; raises ``InvalidConfig`` when it is missing or invalid."""
    try:
        text = path.read_bytes()
    except OSError as error:
        raise InvalidConfig(f"cannot read the config {path}: {error.strerror}") from error
    try:
        return model.model_validate_json(text)
    except ValidationError as error:
        raise InvalidConfig(f"the config {path} is invalid: {summary(error)}") from error


def summary(error: ValidationError) -> str:
    """The first few errors as ``field: message``, on one line."""
    errors = error.errors(include_url=False)
    parts = []
    for each in errors[:MAX_ERRORS]:
        where = ".".join(str(part) for part in each["loc"]) or "(root)"
        parts.append(f"{where}: {each['msg']}")
    more = len(errors) - MAX_ERRORS
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
