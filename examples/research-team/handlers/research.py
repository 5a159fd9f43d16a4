"""Handlers of the research team: retriever → analyst → writer.

They need no network: the retriever searches a small built-in library, the
analyst and the writer work from what the retriever stored in the shared
``notes`` bucket, keyed by the run (the event's correlation id).
"""

from __future__ import annotations

from typing import Any

from troupe_runtime.agent import AgentError, Context

LIBRARY: dict[str, list[dict[str, Any]]] = {
    "jetstream": [
        {"claim": "JetStream persists messages in streams", "source": "nats-docs", "weight": 3},
        {
            "claim": "Consumers track delivery and acknowledgement",
            "source": "nats-docs",
            "weight": 2,
        },
        {
            "claim": "KV buckets are streams with per-key history",
            "source": "nats-docs",
            "weight": 2,
        },
        {
            "claim": "Messages can carry a per-message TTL since 2.11",
            "source": "release-notes",
            "weight": 1,
        },
    ],
    "kubernetes": [
        {
            "claim": "Controllers reconcile desired and observed state",
            "source": "k8s-docs",
            "weight": 3,
        },
        {"claim": "Custom resources extend the API", "source": "k8s-docs", "weight": 2},
        {
            "claim": "Pod Security admission enforces profiles per namespace",
            "source": "k8s-docs",
            "weight": 1,
        },
    ],
}


def _topic(ctx: Context) -> str:
    data = ctx.event.data
    topic = data.get("topic") if isinstance(data, dict) else None
    if not isinstance(topic, str) or not topic:
        raise AgentError("NoTopic", "the request needs a topic")
    return topic.lower()


def _run(ctx: Context) -> str:
    return ctx.event.correlationid or ctx.event.id


async def retrieve(ctx: Context) -> dict[str, Any]:
    """Find the facts on the topic and keep them in shared state for the others."""
    topic = _topic(ctx)
    facts = LIBRARY.get(topic)
    if facts is None:
        raise AgentError("UnknownTopic", f"nothing in the library on {topic!r}")
    notes = await ctx.state.bucket("notes")
    await notes.put(f"facts.{_run(ctx)}", facts)
    # Every retrieval counts towards the topic's popularity, under revision checks.
    await notes.update(f"popularity.{topic}", lambda count: (count or 0) + 1)
    return {"topic": topic, "facts": len(facts)}


async def analyze(ctx: Context) -> dict[str, Any]:
    """Rank the stored facts and name the sources they lean on."""
    notes = await ctx.state.bucket("notes")
    stored = await notes.get(f"facts.{_run(ctx)}")
    if stored is None:
        raise AgentError("NoFacts", "the retriever stored no facts for this run")
    ranked = sorted(stored.value, key=lambda fact: -fact["weight"])
    sources = sorted({fact["source"] for fact in ranked})
    return {
        "topic": ctx.event.data["topic"],
        "key_points": [f["claim"] for f in ranked[:3]],
        "sources": sources,
    }


async def write(ctx: Context) -> dict[str, Any]:
    """Turn the analysis into a short report."""
    analysis = ctx.event.data
    notes = await ctx.state.bucket("notes")
    popularity = await notes.get(f"popularity.{analysis['topic']}")
    lines = [f"# {analysis['topic'].title()}: what we know", ""]
    lines += [f"- {point}" for point in analysis["key_points"]]
    lines += ["", f"Sources: {', '.join(analysis['sources'])}."]
    lines += [f"Requests on this topic so far: {popularity.value if popularity else 1}."]
    return {"report": "\n".join(lines)}
