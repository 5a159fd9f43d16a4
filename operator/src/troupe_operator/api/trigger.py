"""The Trigger API: what starts an Agent's event or a Workflow's run without a caller.

The spec is the runtime contract's own model (``troupe_runtime.contract.triggers``). What
its validators check and OpenAPI can say (exactly one source) the CRD checks in CEL
(``TRIGGER_RULES``); a cron expression, a time zone and JMESPath cannot be checked in CEL,
so the operator reports them in the Stalled and Ready conditions (reason SpecInvalid).
"""

from __future__ import annotations

from pydantic import Field

from troupe_operator.api.common import rule
from troupe_operator.api.status import ObjectStatus
from troupe_runtime.contract.triggers import TriggerSpec

TRIGGER_RULES = [
    rule(
        "(has(self.spec.source.cron) ? 1 : 0) + (has(self.spec.source.webhook) ? 1 : 0)"
        " + (has(self.spec.source.subject) ? 1 : 0) == 1",
        "source needs exactly one of cron, webhook and subject",
        ".spec.source",
    ),
]
"""What ``TriggerSpec``'s validators refuse that CEL can say."""


class TriggerStatus(ObjectStatus):
    """What the operator last observed of the Trigger's fires."""

    last_fire_time: str | None = Field(default=None, description="RFC 3339: the last fire.")
    next_fire_time: str | None = Field(default=None, description="RFC 3339; cron only.")
    fires: int = Field(default=0, description="Fires so far.")
    failures: int = Field(default=0, description="Fires that failed.")
    last_failure: str = Field(default="", description="Why the last failure failed.")


__all__ = ["TRIGGER_RULES", "TriggerSpec", "TriggerStatus"]
