"""An LLM agent's usage over the last hour, from the namespace's usage bucket: pure.

The runtime adds each completion's usage to the key
``<agent>.<provider>.<model-token>.<UTC minute YYYYmmddHHMM>`` (JSON ``Usage``); the pass
lists the agent's keys (``<agent>.>``), keeps those of the last ``WINDOW`` by the minute in
their name (``recent_keys``, before reading any value), and sums the values read
(``summed``). The bucket's TTL (2h) removes the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

from pydantic import ValidationError

from troupe_operator.api.status import AgentUsage
from troupe_runtime.contract.usage import Usage

WINDOW = timedelta(hours=1)
WINDOW_NAME = "1h"
MINUTE_FORMAT = "%Y%m%d%H%M"
COST_DIGITS = 6
"""Dollars are rounded to a millionth, so the same records always give the same status."""


def key_filter(agent: str) -> str:
    """The KV key filter of one agent's usage records."""
    return f"{agent}.>"


def _minute(key: str) -> datetime | None:
    try:
        return datetime.strptime(key.rsplit(".", 1)[-1], MINUTE_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def recent_keys(keys: Iterable[str], agent: str, now: datetime) -> list[str]:
    """The agent's keys whose minute lies within the last hour (the current minute and the
    59 before it), sorted."""
    oldest = now.astimezone(UTC).replace(second=0, microsecond=0) - WINDOW
    prefix = f"{agent}."
    return sorted(
        key
        for key in keys
        if key.startswith(prefix)
        and key.count(".") >= 3
        and (minute := _minute(key)) is not None
        and oldest < minute <= now
    )


def summed(values: Mapping[str, bytes]) -> AgentUsage:
    """The sum of the records read; one that is not a ``Usage`` counts for nothing."""
    total = Usage()
    for key in sorted(values):
        try:
            total = total + Usage.model_validate_json(values[key])
        except ValidationError:
            continue
    return AgentUsage(
        tokens_in=total.tokens_in,
        tokens_out=total.tokens_out,
        tokens=total.tokens,
        cost_usd=round(total.cost_usd, COST_DIGITS),
        window=WINDOW_NAME,
    )
