"""Secrets out of text people read: URLs lose their userinfo and their query.

A NATS URL may carry a user and password (``nats://user:pass@host``) or a token
(``nats://token@host``), and an HTTP URL a token in its query. Status, Events and logs
are read by anyone with view rights, so every URL in them goes through ``redact``. The
rule is deliberately blunt: everything between ``://`` and the URL's last ``@`` goes,
and so does everything after its ``?``, even when that hides something harmless.
"""

from __future__ import annotations

import re

HIDDEN = "***"
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>]*")
"""A URL as it appears in a sentence: a scheme, then anything up to whitespace or quotes."""


def _redact_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    at, query = rest.rfind("@"), rest.find("?")
    if query != -1 and query < at:
        # A "?" in the password or an "@" in the query: no telling which, hide it all.
        return f"{scheme}://{HIDDEN}"
    if at != -1:
        rest = f"{HIDDEN}@{rest[at + 1 :]}"
    if "?" in rest:
        rest = f"{rest.split('?', 1)[0]}?{HIDDEN}"
    return f"{scheme}://{rest}"


def redact(text: str) -> str:
    """``text`` with every URL's userinfo and query replaced by ``***``."""
    return URL.sub(lambda match: _redact_url(match.group(0)), text)
