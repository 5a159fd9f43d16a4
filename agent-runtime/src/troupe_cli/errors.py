"""The one error the CLI reports to a person instead of a traceback."""

from __future__ import annotations


class CliError(Exception):
    """What went wrong, naming the object and what to do; the command exits 1."""
