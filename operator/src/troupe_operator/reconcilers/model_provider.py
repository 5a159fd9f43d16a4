"""ModelProviders: a pass reads the key, probes the endpoint and writes status.

Level-based like every pass: the same Secret and the same answer give the same status, so
an idle pass writes nothing; a change of condition is an Event. The pass owns no objects
and nothing in NATS, so a ModelProvider has no finalizer. It runs on create, update and
resume, at every resync (which is how a fixed Secret or a recovered endpoint is noticed:
the operator does not watch Secrets), and with backoff while the endpoint is unreachable.
A new or changed provider wakes the Agents that name it: their runtime config embeds its
spec, and one waiting for it (ProviderMissing) turns Ready.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from troupe_operator import metrics
from troupe_operator.api import ModelProviderSpec, ModelProviderStatus
from troupe_operator.builders import model_provider as builders
from troupe_operator.builders import status
from troupe_operator.clients import models
from troupe_operator.reconcilers.common import (
    Operator,
    announce,
    spec_problems,
    write_status,
)
from troupe_runtime.contract.redact import redact

KIND = "ModelProvider"
PLURAL = "modelproviders"
logger = logging.getLogger(__name__)


async def _key(
    operator: Operator, namespace: str, spec: ModelProviderSpec
) -> tuple[status.Observation, str | None]:
    """Whether the key can be read, and the key (None: the provider sends none)."""
    selector = spec.api_key_secret
    found = None if selector is None else await operator.kube.read_secret(namespace, selector.name)
    observed = builders.secret_observation(spec, found)
    if selector is None or found is None or not observed.ok:
        return observed, None
    return observed, found[selector.key].decode(errors="replace").strip()


async def _write(
    operator: Operator,
    namespace: str,
    name: str,
    next_status: Callable[[ModelProviderStatus, datetime], ModelProviderStatus],
) -> None:
    async def compute(body: dict[str, Any]) -> ModelProviderStatus:
        previous = ModelProviderStatus.model_validate(body.get("status") or {})
        new: ModelProviderStatus = next_status(previous, datetime.now(UTC))
        conditions = status.keep_transition_times(previous.conditions, new.conditions)
        return new.model_copy(update={"conditions": conditions})

    written = await write_status(operator.kube, PLURAL, namespace, name, compute)
    await announce(operator.kube, KIND, written)


async def provider_pass(operator: Operator, body: Mapping[str, Any]) -> str | None:
    """One pass over one ModelProvider; returns what blocks it (the endpoint unreachable),
    for the caller to retry with backoff, or None."""
    meta = body["metadata"]
    namespace, name = str(meta["namespace"]), str(meta["name"])
    generation = int(meta.get("generation") or 1)
    raw_spec = body.get("spec") or {}
    async with operator.lock(KIND, namespace, name):
        return await _provider_pass(operator, namespace, name, generation, raw_spec)


async def _provider_pass(
    operator: Operator, namespace: str, name: str, generation: int, raw_spec: Mapping[str, Any]
) -> str | None:
    with metrics.reconcile_timer(KIND):
        try:
            spec = ModelProviderSpec.model_validate(raw_spec)
        except ValidationError as error:
            said = "; ".join(p.sentence() for p in spec_problems(error, raw_spec))
            await _write(
                operator,
                namespace,
                name,
                lambda previous, now: status.with_observations(
                    previous,
                    [status.spec_invalid(said)],
                    status.PROVIDER_SUBCONDITIONS,
                    generation,
                    now,
                ),
            )
            return None
        try:
            secret, key = await _key(operator, namespace, spec)
            probe = (
                await models.probe(builders.models_url(spec), key, spec.headers)
                if secret.ok
                else None
            )
        except Exception as error:
            message = redact(f"{type(error).__name__}: {error}")
            logger.exception("%s %s/%s: the pass failed", KIND, namespace, name)
            failed = status.reconcile_failed(status.ENDPOINT_REACHABLE, message)
            await _write(
                operator,
                namespace,
                name,
                lambda previous, now: status.with_observations(
                    previous, [failed], status.PROVIDER_SUBCONDITIONS, generation, now
                ),
            )
            return f"the pass failed: {message}"
        await _write(
            operator,
            namespace,
            name,
            lambda previous, now: builders.provider_status(
                previous, generation, now, spec, secret, probe
            ),
        )
    if probe is not None and probe.outcome == "unreachable":
        return f"{builders.models_url(spec)} unreachable: {probe.detail}"
    return None
