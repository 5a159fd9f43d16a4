"""Entry point: ``python -m troupe_runtime``."""

import argparse

from troupe_runtime import __version__


def main(argv: list[str] | None = None) -> int:
    """Parse the command line; the message loop arrives with the runtime issue."""
    parser = argparse.ArgumentParser(
        prog="troupe_runtime",
        description="Troupe agent runtime: runs one agent handler on NATS JetStream.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
