"""The runtime's Prometheus metrics, in a registry of its own.

A registry per runtime (not the process-global default) lets tests and
benchmarks run several runtimes in one process without name clashes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RuntimeMetrics:
    """Messages by outcome, handler latency, in-flight, throttling, retries, dead letters."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.messages = Counter(
            "troupe_messages",
            "Messages finished, by outcome "
            "(succeeded, retried, deferred, dead_lettered, requeued, parked: waiting for an "
            "approval, ignored: a decision that changed nothing).",
            ["outcome"],
            registry=self.registry,
        )
        self.handler_seconds = Histogram(
            "troupe_handler_seconds",
            "Time from handler start to outputs acknowledged.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "troupe_in_flight", "Messages being handled now.", registry=self.registry
        )
        self.throttled = Counter(
            "troupe_throttled", "Messages that waited for the rate limit.", registry=self.registry
        )
        self.retries = Counter(
            "troupe_retries", "Messages handed back for a later attempt.", registry=self.registry
        )
        self.dead_lettered = Counter(
            "troupe_dead_lettered",
            "Messages sent to the dead-letter stream, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.handler_stuck_threads = Gauge(
            "troupe_handler_stuck_threads",
            "Sync handler threads still running after their call timed out (never reclaimed "
            "until the process restarts).",
            registry=self.registry,
        )
        self.state_conflicts = Counter(
            "troupe_state_conflicts",
            "Compare-and-set conflicts on shared state, by bucket.",
            ["bucket"],
            registry=self.registry,
        )
        self.reopened = Counter(
            "troupe_nats_reopened",
            "Times the runtime opened a new NATS connection and bound again, by cause "
            "(closed: the connection was closed for good; fetch_loop: fetching ended; "
            "failed: starting to serve failed).",
            ["cause"],
            registry=self.registry,
        )
        self.unable_seconds = Gauge(
            "troupe_unable_seconds",
            "Seconds the runtime has been unable to process messages (0 when able); "
            "past the liveness bound /healthz fails.",
            registry=self.registry,
        )
        self.rescuer_restarts = Counter(
            "troupe_rescuer_restarts",
            "Times the MAX_DELIVERIES rescue loop ended unexpectedly and was started again.",
            registry=self.registry,
        )
        self.advisories = Counter(
            "troupe_advisories",
            "Messages on the MAX_DELIVERIES advisory subject, by verdict (rescue, defer: "
            "not proved yet, drop: handled already or forged, junk: not an advisory).",
            ["verdict"],
            registry=self.registry,
        )
        self.llm = LlmMetrics(self.registry)
        self.budget = BudgetMetrics(self.registry)
        self.chaos = ChaosMetrics(self.registry)


class LlmMetrics:
    """An LLM agent's model calls: tokens and dollars by model, outcomes, fallbacks; its
    tool calls by kind and outcome."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.tokens = Counter(
            "troupe_llm_tokens",
            "Tokens of model calls, by agent, provider, model and direction (in: prompt, "
            "out: completion); estimated at about 4 characters per token when the provider "
            "reports none.",
            ["agent", "provider", "model", "direction"],
            registry=registry,
        )
        self.cost = Counter(
            "troupe_llm_cost_usd",
            "Dollars of model calls at the ModelProvider's prices, by agent, provider, model.",
            ["agent", "provider", "model"],
            registry=registry,
        )
        self.requests = Counter(
            "troupe_llm_requests",
            "Model calls of the loop, by outcome (succeeded, rate_limited, unavailable, "
            "rejected, failed); a failed call is counted on the chain's first model.",
            ["agent", "provider", "model", "outcome"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "troupe_llm_fallbacks",
            "Models passed over for the next one of the chain, by reason (rate_limited, "
            "unavailable, timeout, circuit_open).",
            ["agent", "from_model", "to_model", "reason"],
            registry=registry,
        )
        self.tool_calls = Counter(
            "troupe_llm_tool_calls",
            "Tool calls the model made that reached a tool, by agent, kind (function, agent, "
            "a2a, mcp) and outcome (succeeded; error: the tool answered an error the model "
            "reads; failed: it raised).",
            ["agent", "kind", "outcome"],
            registry=registry,
        )


CHECK_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1,
    5,
    10,
)
"""A budget check is a KV round trip or two: sub-millisecond buckets say how many."""


class BudgetMetrics:
    """Budget holds by outcome, what the ledgers were charged, limits crossed, check time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.holds = Counter(
            "troupe_budget_holds",
            "Holds asked of a budget before a model call, by outcome (granted, refused: a "
            "hard limit, unavailable: the ledger could not be advanced in time).",
            ["budget", "outcome"],
            registry=registry,
        )
        self.spent_tokens = Counter(
            "troupe_budget_spent_tokens",
            "Tokens committed to a budget's ledger by this runtime (actual usage).",
            ["budget"],
            registry=registry,
        )
        self.spent_usd = Counter(
            "troupe_budget_spent_usd",
            "Dollars committed to a budget's ledger by this runtime (actual usage).",
            ["budget"],
            registry=registry,
        )
        self.crossings = Counter(
            "troupe_budget_limit_crossings",
            "Commits that took a budget's window past a limit, by level (soft, hard) and "
            "unit (tokens, costUsd).",
            ["budget", "level", "unit"],
            registry=registry,
        )
        self.check_seconds = Histogram(
            "troupe_budget_check_seconds",
            "Time to take the holds of one model call on every budget that applies.",
            buckets=CHECK_BUCKETS,
            registry=registry,
        )
        self.conflicts = Counter(
            "troupe_budget_conflicts",
            "Compare-and-set races lost on a budget's ledger (retried).",
            ["budget"],
            registry=registry,
        )
        self.junk = Counter(
            "troupe_budget_junk",
            "Ledgers or definitions in the budget bucket that did not parse, by kind.",
            ["kind"],
            registry=registry,
        )


class ChaosMetrics:
    """Faults a ChaosExperiment had this runtime inject, so an experiment's effect shows."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.injected = Counter(
            "troupe_chaos_injected",
            "Faults injected for a ChaosExperiment, by point (handler, model, tools, "
            "messages, connection) and kind (latency, error, delay, duplicate, drop).",
            ["point", "kind"],
            registry=registry,
        )
        self.active = Gauge(
            "troupe_chaos_active",
            "1 while a ChaosExperiment's faults are in force for this agent, else 0.",
            registry=registry,
        )
