"""NATS names derived from an agent's namespace and name.

Subjects are namespaced (``troupe.<namespace>.<agent>.…``) so that agents of
different namespaces never see each other's traffic; stream, consumer and
bucket names may not contain dots, so they join the parts with underscores.
"""

from __future__ import annotations

SUBJECT_ROOT = "troupe"

# The durable consumers whose names are fixed by role rather than derived.
RESCUER_CONSUMER = "rescuer"
TRIGGERS_CONSUMER = "engine_triggers"
REPLIES_CONSUMER = "engine_replies"
MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
ENGINE_SUFFIX = "-engine"
"""A Workflow's engine objects are ``<workflow>-engine``: no Agent may be named so."""


def _token(value: str) -> str:
    return value.replace(".", "_")


def inbox_subject(namespace: str, agent: str, priority: int) -> str:
    """The subject a message of ``priority`` for the agent is published to."""
    return f"{SUBJECT_ROOT}.{_token(namespace)}.{_token(agent)}.in.p{priority}"


def inbox_wildcard(namespace: str, agent: str) -> str:
    return f"{SUBJECT_ROOT}.{_token(namespace)}.{_token(agent)}.in.>"


def inbox_stream(namespace: str, agent: str) -> str:
    return f"TROUPE_{_token(namespace)}_{_token(agent)}"


def consumer_name(agent: str, priority: int) -> str:
    """The durable consumer that feeds one priority level to the agent's replicas."""
    return f"{_token(agent)}_p{priority}"


def dead_letter_subject(namespace: str, agent: str) -> str:
    return f"{SUBJECT_ROOT}.{_token(namespace)}.{_token(agent)}.dlq"


def dead_letter_stream(namespace: str, agent: str) -> str:
    return f"TROUPE_DLQ_{_token(namespace)}_{_token(agent)}"


def advisory_stream(namespace: str, agent: str) -> str:
    """Stores the server's MAX_DELIVERIES advisories for the agent's inbox, so a
    message that crashes every replica is rescued even if none was listening."""
    return f"TROUPE_ADV_{_token(namespace)}_{_token(agent)}"


def kv_stream(bucket: str) -> str:
    """The stream JetStream keeps a KV bucket in (its ``KV_`` naming rule)."""
    return f"KV_{bucket}"


def pull_next_subject(stream: str, consumer: str) -> str:
    """The JetStream API subject a pull request for ``consumer`` is sent to."""
    return f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"


def max_deliveries_advisory(stream: str, consumer: str) -> str:
    """The subject of the server's MAX_DELIVERIES advisories for one consumer."""
    return f"{MAX_DELIVERIES_ADVISORY}.{stream}.{consumer}"


def kv_bucket(namespace: str, bucket: str) -> str:
    """Buckets are shared by the agents of one namespace that declare the same name."""
    return f"troupe_{_token(namespace)}_{_token(bucket)}"


def rate_limit_bucket(namespace: str) -> str:
    """The KV bucket holding shared (GCRA) rate-limit state for a namespace's agents."""
    return f"troupe_{_token(namespace)}_ratelimits"


def event_log_stream(namespace: str) -> str:
    """The stream holding the append-only event logs of a namespace, one subject per id."""
    return f"TROUPE_EVENTS_{_token(namespace)}"


def event_log_subject(namespace: str, correlation_id: str) -> str:
    return f"{SUBJECT_ROOT}.{_token(namespace)}.events.{_token(correlation_id)}"


def workflow_stream(namespace: str, workflow: str) -> str:
    """One stream per workflow: its run events, agent replies and results."""
    return f"TROUPE_WF_{_token(namespace)}_{_token(workflow)}"


def workflow_subject(namespace: str, workflow: str, kind: str, run_id: str = "*") -> str:
    """``kind``: ``start`` (starts a run), ``events`` (a run's log), ``replies`` (from
    agents), ``results`` (a run's outcome) or ``failed`` (dead-lettered runs)."""
    return f"{SUBJECT_ROOT}.{_token(namespace)}.wf.{_token(workflow)}.{kind}.{_token(run_id)}"


def workflow_runs_bucket(namespace: str, workflow: str) -> str:
    """The KV bucket holding each run's projection, keyed by run id."""
    return f"troupe_{_token(namespace)}_wf_{_token(workflow)}_runs"


def workflow_dead_letter_stream(namespace: str, workflow: str) -> str:
    return f"TROUPE_WF_DLQ_{_token(namespace)}_{_token(workflow)}"


# Subjects of the server itself: the JetStream API, system events, KV and object stores.
# Nothing a message asks for may be published there.
RESERVED_SUBJECT_PREFIX = "$"


def workflow_replies_wildcard(namespace: str) -> str:
    """The reply subjects of every workflow engine in ``namespace``: where ``replyto`` may
    point (``workflow_subject(namespace, <workflow>, "replies", <run>)``)."""
    return workflow_subject(namespace, "*", "replies", "*")


def is_literal_subject(subject: str) -> bool:
    """A subject one can publish to: non-empty tokens, no wildcards, no whitespace."""
    if not subject or any(char in subject for char in "*>") or not subject.isprintable():
        return False
    return all(token and not any(c.isspace() for c in token) for token in subject.split("."))


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS matching: ``*`` is one token, a final ``>`` one or more; ``subject`` is literal."""
    if not is_literal_subject(subject):
        return False
    wanted, tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">" and index == len(wanted) - 1:
            return len(tokens) > index
        if index >= len(tokens) or token not in ("*", tokens[index]):
            return False
    return len(tokens) == len(wanted)
