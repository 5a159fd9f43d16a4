"""Handlers of the support-triage team: classifier → responder.

The classifier sorts a ticket by keywords; the responder drafts a reply and
refuses abusive tickets with a non-retryable error state, which sends them to
the dead-letter stream with the reason.
"""

from __future__ import annotations

from typing import Any

from troupe_runtime.agent import AgentError, Context

CATEGORIES = {
    "outage": ("down", "outage", "unreachable", "500"),
    "billing": ("invoice", "charge", "refund", "billing"),
    "account": ("password", "login", "locked", "account"),
}
ABUSIVE = ("idiot", "stupid")
REPLIES = {
    "outage": "We are investigating the outage now and will update you within 30 minutes.",
    "billing": "Our billing team will review the charge and reply within one business day.",
    "account": "We have sent you a secure link to regain access to your account.",
    "other": "Thanks for reaching out; an agent will get back to you shortly.",
}


def classify_text(text: str) -> str:
    lowered = text.lower()
    for category, words in CATEGORIES.items():
        if any(word in lowered for word in words):
            return category
    return "other"


async def classify(ctx: Context) -> dict[str, Any]:
    ticket = ctx.event.data
    return {"ticket": ticket, "category": classify_text(str(ticket.get("text", "")))}


async def respond(ctx: Context) -> dict[str, Any]:
    ticket, category = ctx.event.data["ticket"], ctx.event.data["category"]
    if any(word in str(ticket.get("text", "")).lower() for word in ABUSIVE):
        raise AgentError("Abusive", f"ticket {ticket.get('id')} needs a human moderator")
    return {
        "ticket": ticket.get("id"),
        "category": category,
        "priority": ctx.event.priority or 0,
        "reply": REPLIES[category],
    }
