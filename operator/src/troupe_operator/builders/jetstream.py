"""Which shared JetStream streams an Agent's deletion leaves without users.

KV buckets are per namespace and shared by every Agent declaring the same name
(``troupe_runtime.contract.naming.kv_bucket``), as are the namespace's event log and its
global rate-limit bucket; each goes only with the last Agent that uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

from troupe_operator.api import AgentSpec
from troupe_runtime.contract import naming


def _uses_global_rate_limit(spec: AgentSpec) -> bool:
    return spec.rate_limit is not None and spec.rate_limit.scope == "global"


def orphaned_streams(namespace: str, spec: AgentSpec, others: Sequence[AgentSpec]) -> list[str]:
    """Streams of shared resources ``spec`` uses that none of ``others`` (staying Agents) use."""
    kept = {bucket.name for other in others for bucket in other.state}
    streams = [
        naming.kv_stream(naming.kv_bucket(namespace, bucket.name))
        for bucket in spec.state
        if bucket.name not in kept
    ]
    if _uses_global_rate_limit(spec) and not any(map(_uses_global_rate_limit, others)):
        streams.append(naming.kv_stream(naming.rate_limit_bucket(namespace)))
    if not others:
        streams.append(naming.event_log_stream(namespace))
    return streams
