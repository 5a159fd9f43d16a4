"""The errors the CLI reports to a person instead of a traceback."""

from __future__ import annotations


class CliError(Exception):
    """What went wrong, naming the object and what to do; the command exits 1."""

    exit_code = 1


class Refused(CliError):
    """The call was refused (a usage error, or the gateway's 4xx): the command exits 2."""

    exit_code = 2
