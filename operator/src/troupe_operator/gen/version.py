"""Keeps the chart's version and appVersion equal to Troupe's one version.

The repository's ``VERSION`` file feeds the packages' metadata, which
``troupe_runtime.contract.version`` reads; the chart cannot read a file, so
``make versions`` writes the two fields and ``make verify`` fails when they drift.

    python -m troupe_operator.gen.version write|check charts/troupe/Chart.yaml
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from troupe_runtime.contract.version import VERSION

_FIELDS = (("version", "{}"), ("appVersion", '"{}"'))


def render(chart_yaml: str, version: str = VERSION) -> str:
    """``Chart.yaml``'s text with both version fields set to ``version``, comments kept."""
    for field, form in _FIELDS:
        chart_yaml, count = re.subn(
            rf"^{field}: .*$", f"{field}: {form.format(version)}", chart_yaml, flags=re.M
        )
        if count != 1:
            raise ValueError(f"Chart.yaml must have one top-level {field} line, found {count}")
    return chart_yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="troupe_operator.gen.version", description=__doc__)
    parser.add_argument("command", choices=["write", "check"])
    parser.add_argument("chart_yaml", type=Path)
    args = parser.parse_args(argv)
    path: Path = args.chart_yaml
    text = path.read_text()
    wanted = render(text)
    if args.command == "write":
        path.write_text(wanted)
        return 0
    if text != wanted:
        print(f"{path} does not carry version {VERSION}: run `make versions`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
