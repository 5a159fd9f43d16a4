"""Golden files of the builders' manifests, in ``tests/unit/golden``.

Regenerate them after an intended change with ``TROUPE_UPDATE_GOLDEN=1 pytest tests/unit``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

GOLDEN = Path(__file__).parent / "golden"


def assert_golden(name: str, manifest: dict[str, Any] | None) -> None:
    """``manifest`` as YAML equals ``golden/<name>.yaml``, or rewrites it when asked to."""
    path = GOLDEN / f"{name}.yaml"
    text = yaml.safe_dump(manifest, sort_keys=True)
    if os.environ.get("TROUPE_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} changed; see tests/unit/golden_support.py"
