"""A ModelProvider's probe → its status: pure.

The pass reads the API key from the provider's Secret and probes ``GET {baseUrl}/models``
(``clients.models``); this module turns what it found into kstatus conditions. Ready is True
with reason ``Probed`` when the endpoint listed its models; otherwise Ready is False with the
reason of the first failing sub-condition: ``SecretMissing`` (stalled: the Secret or its key
is absent), ``Unreachable`` (progressing: connection refused, timeout, 5xx or 429, retried
with backoff), ``Unauthorized`` (stalled: 401 or 403) or ``InvalidResponse`` (stalled: not an
OpenAI model list, often a baseUrl missing its ``/v1``). Messages name the Secret and the URL
(redacted), never the key or a response body.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from troupe_operator.api import ModelProviderSpec, ModelProviderStatus
from troupe_operator.api.model_provider import MODELS_SHOWN
from troupe_operator.builders.status import (
    ENDPOINT_REACHABLE,
    PROVIDER_SUBCONDITIONS,
    SECRETS_RESOLVED,
    SPEC_VALID_OK,
    Observation,
    with_observations,
)
from troupe_runtime.contract.redact import redact

PROBED = "Probed"
UNREACHABLE = "Unreachable"
UNAUTHORIZED = "Unauthorized"
INVALID_RESPONSE = "InvalidResponse"
SECRET_MISSING = "SecretMissing"
NOT_LISTED_SHOWN = 8
"""Declared models missing from the endpoint's list that the Ready message names."""

Outcome = Literal["listed", "unreachable", "unauthorized", "invalid"]


@dataclass(frozen=True)
class Probe:
    """What ``GET {baseUrl}/models`` came to. ``detail`` is for people and already safe:
    an HTTP status or an exception's kind, never a body or a header."""

    outcome: Outcome
    detail: str = ""
    models: tuple[str, ...] = ()


def models_url(spec: ModelProviderSpec) -> str:
    return spec.base_url.rstrip("/") + "/models"


def secret_observation(spec: ModelProviderSpec, found: dict[str, bytes] | None) -> Observation:
    """Whether the key's Secret and key exist (a provider without a key needs neither)."""
    selector = spec.api_key_secret
    if selector is None:
        return Observation(SECRETS_RESOLVED, True, "NoKey", "no API key: none is sent")
    if found is None:
        return Observation(
            SECRETS_RESOLVED,
            False,
            SECRET_MISSING,
            f"spec.apiKeySecret: Secret {selector.name} does not exist: create it or fix the "
            "reference",
            stalled=True,
        )
    if selector.key not in found:
        return Observation(
            SECRETS_RESOLVED,
            False,
            SECRET_MISSING,
            f"spec.apiKeySecret: Secret {selector.name} has no key {selector.key}",
            stalled=True,
        )
    return Observation(
        SECRETS_RESOLVED, True, "SecretFound", f"the key is in Secret {selector.name}"
    )


def probe_observation(spec: ModelProviderSpec, probe: Probe) -> Observation:
    url = redact(models_url(spec))
    if probe.outcome == "listed":
        listed = set(probe.models)
        absent = [m.name for m in spec.models if m.name not in listed]
        said = f"GET {url} listed {len(listed)} models"
        if absent:
            names = ", ".join(absent[:NOT_LISTED_SHOWN])
            more = (
                f" and {len(absent) - NOT_LISTED_SHOWN} more"
                if len(absent) > NOT_LISTED_SHOWN
                else ""
            )
            said += f"; it does not list {names}{more} (requests name them anyway)"
        return Observation(ENDPOINT_REACHABLE, True, PROBED, said)
    if probe.outcome == "unreachable":
        return Observation(
            ENDPOINT_REACHABLE,
            False,
            UNREACHABLE,
            f"GET {url}: {probe.detail}; retrying with backoff",
            stalled=False,
        )
    if probe.outcome == "unauthorized":
        selector = spec.api_key_secret
        whose = (
            f"the key in Secret {selector.name} (key {selector.key}) was refused"
            if selector is not None
            else "the endpoint wants a key: set spec.apiKeySecret"
        )
        return Observation(
            ENDPOINT_REACHABLE,
            False,
            UNAUTHORIZED,
            f"GET {url} answered {probe.detail}: {whose}; fix it and the next resync probes again",
            stalled=True,
        )
    return Observation(
        ENDPOINT_REACHABLE,
        False,
        INVALID_RESPONSE,
        f"GET {url} {probe.detail}, not an OpenAI model list: is spec.baseUrl the API's base "
        "(such as http://host:8080/v1)?",
        stalled=True,
    )


def provider_status(
    previous: ModelProviderStatus,
    generation: int,
    now: datetime,
    spec: ModelProviderSpec,
    secret: Observation,
    probe: Probe | None,
) -> ModelProviderStatus:
    """The next status. ``probe`` is None when the key could not be read: the endpoint was
    not asked, and what the last probe saw is kept."""
    observed = [SPEC_VALID_OK, secret]
    models: Sequence[str] = previous.models
    if probe is not None:
        observed.append(probe_observation(spec, probe))
    if probe is not None and probe.outcome == "listed":
        models = sorted(set(probe.models))[:MODELS_SHOWN]
    status = with_observations(
        previous, observed, PROVIDER_SUBCONDITIONS, generation, now, ready_reason=PROBED
    )
    return status.model_copy(update={"models": list(models)})
