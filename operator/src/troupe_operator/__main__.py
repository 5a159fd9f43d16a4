"""Entry point: ``python -m troupe_operator``."""

import argparse

from troupe_operator import __version__


def main(argv: list[str] | None = None) -> int:
    """Parse the command line; the reconcilers arrive with the operator issue."""
    parser = argparse.ArgumentParser(
        prog="troupe_operator",
        description="Troupe operator: reconciles troupe.dev Agents and Workflows.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
