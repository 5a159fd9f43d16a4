"""Every name Troupe derives from a namespace and an object's name: one grammar.

Subjects have a root per kind, so no Agent, Workflow or event log can reach another's
traffic, whatever the names::

    troupe.<ns>.agents.<agent>.in.p<N>        an agent's inbox, one per priority level
    troupe.<ns>.agents.<agent>.dlq            its dead letters
    troupe.<ns>.agents.<agent>.approvals      decisions on its tool calls (LLM agents)
    troupe.<ns>.workflows.<wf>.<kind>.<run>   a workflow's runs (``WORKFLOW_KINDS``)
    troupe.<ns>.logs.<id>                     the namespace's event logs

Stream, consumer and bucket names may not contain dots, so they join the parts with
underscores. Namespaces and Agent, Workflow and bucket names are DNS labels (no ``_``, no
dots), which keeps the joined names apart (``troupe_<ns>_state_<bucket>`` is never
``troupe_<ns>_ratelimits``) and lets ``stream_owner`` read a stream name back.
Kubernetes objects cannot collide across kinds either: an Agent's ConfigMap ends in
``-runtime``, a Workflow's objects in ``-engine``, and the CRD refuses an Agent named
``…-engine``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SUBJECT_ROOT = "troupe"
AGENTS = "agents"
WORKFLOWS = "workflows"
LOGS = "logs"
WORKFLOW_KINDS = (
    "start",
    "events",
    "replies",
    "results",
    "failed",
    "lease",
    "probe",
    "active",
    "tally",
    "cancel",
    "approve",
)
"""What a workflow's subjects carry (``workflow_subject``)."""

# The durable consumers whose names are fixed by role rather than derived.
RESCUER_CONSUMER = "rescuer"
TRIGGERS_CONSUMER = "engine_triggers"
REPLIES_CONSUMER = "engine_replies"
MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
ENGINE_SUFFIX = "-engine"
"""A Workflow's engine objects are ``<workflow>-engine``: no Agent may be named so."""
RUNTIME_SUFFIX = "-runtime"
"""An Agent's runtime ConfigMap is ``<agent>-runtime``."""

# Subjects of the server itself: the JetStream API, system events, KV and object stores.
# Nothing a message asks for may be published there.
RESERVED_SUBJECT_PREFIX = "$"


def _token(value: str) -> str:
    return value.replace(".", "_")


def _subject(namespace: str, root: str, *tokens: str) -> str:
    return ".".join((SUBJECT_ROOT, _token(namespace), root, *tokens))


# Kubernetes objects.


def agent_deployment(agent: str) -> str:
    return agent


def agent_service_account(agent: str) -> str:
    """The ServiceAccount Troupe creates for an Agent that asks for one."""
    return agent


def agent_config_map(agent: str) -> str:
    return f"{agent}{RUNTIME_SUFFIX}"


def engine_deployment(workflow: str) -> str:
    return f"{workflow}{ENGINE_SUFFIX}"


def engine_config_map(workflow: str) -> str:
    return f"{workflow}{ENGINE_SUFFIX}"


# Agents.


def inbox_subject(namespace: str, agent: str, priority: int) -> str:
    """The subject a message of ``priority`` for the agent is published to."""
    return _subject(namespace, AGENTS, _token(agent), "in", f"p{priority}")


def inbox_wildcard(namespace: str, agent: str) -> str:
    return _subject(namespace, AGENTS, _token(agent), "in", ">")


def own_inbox_pattern(agent: str) -> str:
    """The agent's inboxes in any namespace: an output subject there would be a loop."""
    return inbox_wildcard("*", agent)


def inbox_stream(namespace: str, agent: str) -> str:
    return f"TROUPE_{_token(namespace)}_{_token(agent)}"


def consumer_name(agent: str, priority: int) -> str:
    """The durable consumer that feeds one priority level to the agent's replicas."""
    return f"{_token(agent)}_p{priority}"


def agent_approvals_subject(namespace: str, agent: str) -> str:
    """Where the decisions on an LLM agent's tool calls arrive (``approvals.ApprovalDecision``
    relayed by the operator, and the runtime's own timeouts): one subject per Agent, under
    the Agent's root, stored in its inbox stream and read by its priority-0 consumer. No
    caller text is in it; the decision names its Approval."""
    return _subject(namespace, AGENTS, _token(agent), "approvals")


def dead_letter_subject(namespace: str, agent: str) -> str:
    return _subject(namespace, AGENTS, _token(agent), "dlq")


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
    """A state bucket, shared by the agents of one namespace that declare its name."""
    return f"troupe_{_token(namespace)}_state_{_token(bucket)}"


def rate_limit_bucket(namespace: str) -> str:
    """The KV bucket holding shared (GCRA) rate-limit state for a namespace's agents."""
    return f"troupe_{_token(namespace)}_ratelimits"


# Event logs.


def event_log_stream(namespace: str) -> str:
    """The stream holding the append-only event logs of a namespace, one subject per id."""
    return f"TROUPE_EVENTS_{_token(namespace)}"


def event_log_subject(namespace: str, correlation_id: str) -> str:
    return _subject(namespace, LOGS, _token(correlation_id))


# LLM agents.

STREAMS = "streams"
"""Core-NATS (not JetStream) subjects carrying an LLM agent's token deltas."""


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:32]


def token_stream_subject(namespace: str, run_id: str, event_id: str) -> str:
    """Where the deltas of the answer to event ``event_id`` of run ``run_id`` go (core NATS)."""
    return _subject(namespace, STREAMS, _digest(run_id), _digest(event_id))


def token_stream_wildcard(namespace: str, run_id: str) -> str:
    """Every answer's deltas in run ``run_id``: what ``troupe run --stream`` subscribes to."""
    return _subject(namespace, STREAMS, _digest(run_id), ">")


def conversation_log_id(agent: str, event_id: str) -> str:
    """The event-log correlation id of one message's model loop (its turns and tool calls)."""
    return f"llm-{_token(agent)}-{_digest(event_id)}"


AGENT_CALL_LOG_PREFIX = "call-"
"""Event-log ids of agents-as-tools replies; no conversation log (``llm-``) begins so."""


def agent_call_reply_subject(namespace: str, caller: str, request_id: str) -> str:
    """Where the callee of an LLM agent's tool call replies: a subject of the namespace's
    event log, so the reply is stored and a redelivered caller finds one given while it was
    down."""
    return event_log_subject(
        namespace, f"{AGENT_CALL_LOG_PREFIX}{_token(caller)}-{_digest(request_id)}"
    )


def is_agent_call_reply_subject(namespace: str, subject: str) -> bool:
    """Whether ``subject`` is an ``agent_call_reply_subject`` of ``namespace``."""
    if not subject_matches(event_log_subject(namespace, "*"), subject):
        return False
    return subject.rsplit(".", 1)[1].startswith(AGENT_CALL_LOG_PREFIX)


def llm_object_store(namespace: str) -> str:
    """The Object Store bucket holding tool results too large to keep in the log."""
    return f"troupe_{_token(namespace)}_llm_blobs"


def session_bucket(namespace: str, agent: str) -> str:
    """The KV bucket of one LLM agent's sessions (``contract.sessions``): per Agent, so its
    TTL is the Agent's retention and it goes with the Agent."""
    return f"troupe_{_token(namespace)}_sessions_{_token(agent)}"


SESSION_HISTORY_PREFIX = "history"
SESSION_QUEUE_PREFIX = "queue"


def session_history_key(session: str) -> str:
    """A session's history key: a digest, so any session id makes a valid key."""
    return f"{SESSION_HISTORY_PREFIX}.{_session_digest(session)}"


def session_queue_key(session: str) -> str:
    """A session's queue (its in-flight marker) key."""
    return f"{SESSION_QUEUE_PREFIX}.{_session_digest(session)}"


def _session_digest(session: str) -> str:
    return hashlib.sha256(session.encode()).hexdigest()[:40]


def usage_bucket(namespace: str) -> str:
    """The KV bucket where LLM agents count tokens and cost per agent, model and minute."""
    return f"troupe_{_token(namespace)}_llm_usage"


def provider_limit_key(provider: str, kind: str) -> str:
    """The rate-limit bucket key of a provider's requests (``rpm``) or tokens (``tpm``)."""
    return f"provider.{_token(provider)}.{kind}"


def agent_token_limit_key(agent: str) -> str:
    """The rate-limit bucket key of an Agent's own tokens per minute (``spec.llm.rateLimit``
    with scope global)."""
    return f"agent.{_token(agent)}.tpm"


def trigger_limit_key(trigger: str) -> str:
    """The rate-limit bucket key of a Trigger's fires (``spec.rateLimit``), shared by the
    gateway replicas that fire its webhook and subject messages."""
    return f"trigger.{_token(trigger)}.fires"


# Chaos.


def chaos_bucket(namespace: str) -> str:
    """The KV bucket where the operator writes the faults ChaosExperiments inject into a
    namespace's agents (``contract.chaos``); the runtimes watch their own keys."""
    return f"troupe_{_token(namespace)}_chaos"


CHAOS_FAULTS_PREFIX = "faults"


def chaos_faults_key(agent: str) -> str:
    """Where the ``AgentFaults`` of one Agent are kept (one experiment at a time per agent)."""
    return f"{CHAOS_FAULTS_PREFIX}.{_token(agent)}"


# Budgets.


def budget_bucket(namespace: str) -> str:
    """The KV bucket of a namespace's budgets: definitions (operator) and ledgers (runtime)."""
    return f"troupe_{_token(namespace)}_budgets"


BUDGET_DEFINITION_PREFIX = "def"
BUDGET_LEDGER_PREFIX = "ledger"


def budget_definition_key(budget: str) -> str:
    """Where the operator writes a Budget's ``BudgetDefinition``."""
    return f"{BUDGET_DEFINITION_PREFIX}.{_token(budget)}"


def budget_ledger_key(budget: str, window_id: str) -> str:
    """The ``Ledger`` of one window of a Budget (``window_id`` is already a safe token)."""
    return f"{BUDGET_LEDGER_PREFIX}.{_token(budget)}.{window_id}"


def budget_ledger_wildcard(budget: str) -> str:
    """Every window's ledger of a Budget (to list or prune them)."""
    return f"{BUDGET_LEDGER_PREFIX}.{_token(budget)}.>"


def run_window_token(run: str) -> str:
    """A Run window's id: a digest, since a run (correlation) id is the sender's text."""
    return f"run-{_digest(run)}"


# Workflows.


def workflow_stream(namespace: str, workflow: str) -> str:
    """One stream per workflow: its run events, agent replies and results."""
    return f"TROUPE_WF_{_token(namespace)}_{_token(workflow)}"


def workflow_subject(namespace: str, workflow: str, kind: str, run_id: str = "*") -> str:
    """``kind``: one of ``WORKFLOW_KINDS``, e.g. ``start`` (starts a run), ``events`` (a
    run's log), ``replies`` (from agents), ``results`` (a run's outcome) or ``failed``
    (dead-lettered runs)."""
    return _subject(namespace, WORKFLOWS, _token(workflow), kind, _token(run_id))


def workflow_runs_bucket(namespace: str, workflow: str) -> str:
    """The KV bucket holding each run's projection, keyed by run id."""
    return f"troupe_{_token(namespace)}_wf_{_token(workflow)}_runs"


def workflow_dead_letter_stream(namespace: str, workflow: str) -> str:
    return f"TROUPE_WF_DLQ_{_token(namespace)}_{_token(workflow)}"


def workflow_replies_wildcard(namespace: str) -> str:
    """The reply subjects of every workflow engine in ``namespace``: where ``replyto`` may
    point (``workflow_subject(namespace, <workflow>, "replies", <run>)``)."""
    return workflow_subject(namespace, "*", "replies", "*")


# The gateway (``contract.gateway``).

GATEWAY_REPLY_PREFIX = "gw-"
"""Event-log ids of the replies to gateway calls; no other log id begins so."""
DIRECTORY_AGENTS = "agents"
DIRECTORY_WORKFLOWS = "workflows"


def directory_bucket(namespace: str) -> str:
    """The KV bucket where the operator lists the namespace's Agents and Workflows for the
    gateway (``gateway.DirectoryEntry``)."""
    return f"troupe_{_token(namespace)}_directory"


def directory_key(kind: str, name: str) -> str:
    """``agents.<name>`` or ``workflows.<name>``: ``kind`` is ``Agent`` or ``Workflow``."""
    group = DIRECTORY_AGENTS if kind == "Agent" else DIRECTORY_WORKFLOWS
    return f"{group}.{_token(name)}"


def tasks_bucket(namespace: str) -> str:
    """The KV bucket of the gateway's task records (``gateway.TaskRecord``)."""
    return f"troupe_{_token(namespace)}_tasks"


def task_key(kind: str, name: str, task_id: str) -> str:
    """A task record's key: per target, so ListTasks of one Agent is one key filter
    (``task_key_wildcard``); the task id is the caller's text, hence a digest."""
    return f"{directory_key(kind, name)}.{_digest(task_id)}"


def task_key_wildcard(kind: str, name: str) -> str:
    return f"{directory_key(kind, name)}.*"


def trigger_fires_bucket(namespace: str) -> str:
    """The KV bucket of the namespace's Triggers' fire ledgers (``triggers.FireLedger``),
    keyed by the Trigger's name: whoever fires writes it, the operator copies it to status."""
    return f"troupe_{_token(namespace)}_trigger_fires"


def webhook_seen_bucket(namespace: str) -> str:
    """The KV bucket of webhook signatures already accepted (``_digest`` keys, TTL = the
    longest replay window), so a replayed request is refused by any gateway replica."""
    return f"troupe_{_token(namespace)}_webhook_seen"


def trigger_stream(namespace: str, trigger: str) -> str:
    """The stream that captures a subject Trigger's subject, so a message published while
    no gateway runs still fires once."""
    return f"TROUPE_TRG_{_token(namespace)}_{_token(trigger)}"


TRIGGER_RELAY_CONSUMER = "relay"
"""The durable pull consumer the gateway replicas share on a ``trigger_stream``."""


def webhook_seen_key(signature: str) -> str:
    return _digest(signature)


def gateway_reply_subject(namespace: str, task_id: str) -> str:
    """Where an Agent answers a gateway call: a subject of the namespace's event log, so the
    answer is stored and any gateway replica finds it, one killed mid-call included."""
    return event_log_subject(namespace, f"{GATEWAY_REPLY_PREFIX}{_digest(task_id)}")


def is_gateway_reply_subject(namespace: str, subject: str) -> bool:
    if not subject_matches(event_log_subject(namespace, "*"), subject):
        return False
    return subject.rsplit(".", 1)[1].startswith(GATEWAY_REPLY_PREFIX)


# Approvals (``contract.approvals``).


def approvals_bucket(namespace: str) -> str:
    """The KV bucket of the namespace's approval requests (``approvals.ApprovalRequest``),
    keyed by ``approval_key``: requesters write them, the operator mirrors them as Approval
    objects."""
    return f"troupe_{_token(namespace)}_approvals"


def approval_key(name: str) -> str:
    """An Approval's name is a DNS label (``approvals.approval_name``): a valid key as is."""
    return name


# Reading names back.


@dataclass(frozen=True)
class StreamOwner:
    """The Troupe object a stream belongs to: ``kind`` Agent, Workflow or Namespace
    (the namespace's event log, rate limits and state buckets, ``name`` the bucket's)."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        if self.kind == "Namespace":
            return f"namespace {self.namespace} ({self.name})"
        return f"{self.kind} {self.namespace}/{self.name}"


def _label(value: str) -> bool:
    return bool(value) and value == value.lower() and "_" not in value


def stream_owner(stream: str) -> StreamOwner | None:
    """Whose stream this is, read back from its name; None for a stream not Troupe's."""
    parts = stream.split("_")
    match parts:
        case ["TROUPE", "EVENTS", namespace] if _label(namespace):
            return StreamOwner("Namespace", namespace, "event log")
        case ["TROUPE", "TRG", namespace, name] if _label(namespace) and _label(name):
            return StreamOwner("Trigger", namespace, name)
        case ["TROUPE", "DLQ" | "ADV" | "WF", namespace, name] if _label(namespace) and _label(
            name
        ):
            return StreamOwner("Workflow" if parts[1] == "WF" else "Agent", namespace, name)
        case ["TROUPE", "WF", "DLQ", namespace, name] if _label(namespace) and _label(name):
            return StreamOwner("Workflow", namespace, name)
        case ["TROUPE", namespace, name] if _label(namespace) and _label(name):
            return StreamOwner("Agent", namespace, name)
        case ["KV", "troupe", namespace, "ratelimits"] if _label(namespace):
            return StreamOwner("Namespace", namespace, "rate limits")
        case ["KV", "troupe", namespace, "state", bucket] if _label(namespace) and _label(bucket):
            return StreamOwner("Namespace", namespace, f"state bucket {bucket}")
        case ["KV", "troupe", namespace, "trigger", "fires"] if _label(namespace):
            return StreamOwner("Namespace", namespace, "trigger fires")
        case ["KV", "troupe", namespace, "webhook", "seen"] if _label(namespace):
            return StreamOwner("Namespace", namespace, "webhook signatures")
        case ["KV", "troupe", namespace, "approvals"] if _label(namespace):
            return StreamOwner("Namespace", namespace, "approvals")
        case ["KV", "troupe", namespace, "chaos"] if _label(namespace):
            return StreamOwner("Namespace", namespace, "chaos faults")
        case ["KV", "troupe", namespace, "directory" | "tasks"] if _label(namespace):
            return StreamOwner("Namespace", namespace, f"gateway {parts[3]}")
        case ["KV", "troupe", namespace, "wf", name, "runs"] if _label(namespace) and _label(name):
            return StreamOwner("Workflow", namespace, name)
    return None


# Subject grammar.


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
