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
            "(succeeded, retried, deferred, dead_lettered, requeued).",
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


class LlmMetrics:
    """An LLM agent's model calls: tokens and dollars by model, outcomes, fallbacks."""

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
