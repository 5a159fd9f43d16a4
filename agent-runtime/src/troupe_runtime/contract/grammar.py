"""The grammar of what a manifest may say: one regex per kind of value, shared by the CRD and
the models.

The CRD carries these patterns (and CEL rules built from the constants here), and the
pydantic models check the very same patterns, so the API server and the operator accept
exactly the same values: nothing the API server stores can crash the operator's parse.

Every pattern is written for each regex engine that reads it (Go's RE2 in the API server,
Rust's in pydantic, Python's ``re`` here): no lookaround, no backreferences, no shorthand
classes such as whitespace or word characters (whose meaning differs between them), only
explicit ASCII classes.
"""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction

from troupe_runtime.contract import naming, pod

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_LABEL_MAX = 63
"""Agent, Workflow, step, bucket and container names: RFC 1123 labels, as Kubernetes has them."""
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_SUBDOMAIN_MAX = 253

# NATS subjects. A token is printable ASCII other than space, ".", "*" and ">"; "$" may not
# open a subject (the server's own subjects start with it).
_TOKEN_CHAR = r"[\x21-\x29\x2b-\x2d\x2f-\x3d\x3f-\x7e]"
_FIRST_CHAR = r"[\x21-\x23\x25-\x29\x2b-\x2d\x2f-\x3d\x3f-\x7e]"
_TOKEN = f"{_TOKEN_CHAR}+"
_FIRST_TOKEN = f"{_FIRST_CHAR}{_TOKEN_CHAR}*"
SUBJECT_MAX = 255
OUTPUT_SUBJECT_PATTERN = f"^{_FIRST_TOKEN}(\\.{_TOKEN})*$"
"""A subject one publishes to: no wildcards, no whitespace, no empty token, no leading ``$``."""
TRIGGER_SUBJECT_PATTERN = f"^{_FIRST_TOKEN}(\\.({_TOKEN}|\\*))*(\\.>)?$"
"""A subject a stream captures: ``*`` and a final ``>`` as whole tokens, never the first (a
leading wildcard would overlap Troupe's and the server's subjects)."""
TROUPE_ROOT = naming.SUBJECT_ROOT
"""No trigger subject may start with this token: the subjects under it are Troupe's."""
AGENTS_TOKEN = naming.AGENTS
"""The token after the namespace in an agent's subjects: ``troupe.<ns>.agents.<agent>``."""


def own_inbox_pattern(agent: str) -> str:
    """The subjects of ``agent``'s own inbox: publishing there would feed it its own output."""
    return f"^{TROUPE_ROOT}\\.[^.]+\\.{AGENTS_TOKEN}\\.{re.escape(agent)}\\.in(\\..*)?$"


def is_troupe_subject(subject: str) -> bool:
    """Whether ``subject`` lies under Troupe's root token."""
    return subject == TROUPE_ROOT or subject.startswith(f"{TROUPE_ROOT}.")


ENV_NAME_PATTERN = r"^[ -<>-~]+$"
"""The API server's own rule for env names: printable ASCII other than ``=``."""
ENV_NAME_MAX = 256
ENV_PREFIX_PATTERN = r"^[ -<>-~]*$"
"""An envFrom prefix: what an env name may hold, possibly nothing."""
CONFIG_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
"""A key of a ConfigMap or Secret."""
FIELD_PATH_PATTERN = r"^[\x21-\x7e]+$"
"""A pod field path (metadata.labels['x'], status.podIP): printable, no whitespace."""
RESERVED_ENV_PREFIX = pod.RESERVED_ENV_PREFIX
CODE_ENV = "PYTHONPATH"
"""Set by the operator only for a handler whose code comes from a ConfigMap; otherwise the
spec may set it (to find modules baked into the image, say)."""
RESERVED_ENV_NAMES = tuple(name for name in pod.RESERVED_ENV_NAMES if name != CODE_ENV)


def is_reserved_env(name: str) -> bool:
    """Whether the operator always sets ``name`` in the runtime container itself."""
    return name.startswith(RESERVED_ENV_PREFIX) or name in RESERVED_ENV_NAMES


RUNTIME_CONTAINER = pod.RUNTIME_CONTAINER

QUANTITY_PATTERN = (
    r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?[0-9]{1,2}))?$"
)
"""Kubernetes' quantity syntax (``500m``, ``1Gi``, ``2e3``) as its parser reads it: no sign a
pod refuses, and an exponent that is a whole number (the usual CRD pattern lets ``1e0.5``
through, which the parser then refuses) of at most two digits (no pod needs more)."""
QUANTITY_MAX = 64
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_QUANTITY_PARTS = re.compile(r"\+?([0-9.]+)(.*)")


def quantity_value(quantity: int | str) -> Fraction:
    """The exact value of a quantity matching ``QUANTITY_PATTERN`` (as CEL's ``quantity()``)."""
    if isinstance(quantity, int):
        return Fraction(quantity)
    parts = _QUANTITY_PARTS.fullmatch(quantity)
    if parts is None:
        raise ValueError(f"{quantity!r} is not a quantity")
    number, suffix = parts.groups()
    value = Fraction(Decimal(number))
    if suffix in _BINARY:
        return value * _BINARY[suffix]
    exponent = _DECIMAL[suffix] if suffix in _DECIMAL else int(suffix[1:])
    return value * Fraction(10) ** exponent


def is_extended_resource(name: str) -> bool:
    """An extended resource (``<domain>/<name>``): whole numbers only, never overcommitted."""
    return "/" in name


_NAME_PART = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_PREFIX = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
RESOURCE_NAME_PATTERN = (
    f"^(cpu|memory|ephemeral-storage|hugepages-[-A-Za-z0-9_.]*[A-Za-z0-9]|{_PREFIX}/{_NAME_PART})$"
)
"""A container resource: cpu, memory, ephemeral-storage, hugepages-<size>, or an extended
resource named ``<domain>/<name>`` (see ``is_resource_name`` for what else is refused)."""
RESOURCE_NAME_MAX = 253 + 1 + 63
NATIVE_DOMAIN = "kubernetes.io/"
"""Names with this domain are Kubernetes' own: only the standard ones above exist."""
QUOTA_PREFIX = "requests."
"""Kubernetes refuses extended resources named so: they would read as quota names."""


def is_resource_name(name: str) -> bool:
    """Whether a pod's requests and limits may name ``name``."""
    return (
        matches(RESOURCE_NAME_PATTERN, name)
        and NATIVE_DOMAIN not in name
        and not name.startswith(QUOTA_PREFIX)
    )


IMAGE_PATTERN = r"^[\x21-\x7e]+$"
"""An image reference: printable ASCII, no whitespace anywhere."""
IMAGE_MAX = 1024
HTTP_URL_PATTERN = r"^https?://[\x21-\x7e]+$"
"""An http handler's endpoint: http or https, no whitespace."""
URL_MAX = 2048
QUALIFIED_NAME_PATTERN = f"^({_PREFIX}/)?{_NAME_PART}$"
"""A label or taint key: an optional DNS-subdomain prefix and a name of at most 63."""
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LABEL_VALUE_MAX = 63
QUALIFIED_NAME_MAX = 253 + 1 + 63


def matches(pattern: str, value: str) -> bool:
    """Whether ``value`` matches ``pattern`` as RE2 does: Python's ``$`` would also match
    before a final newline, ``fullmatch`` does not."""
    return re.fullmatch(pattern, value) is not None
