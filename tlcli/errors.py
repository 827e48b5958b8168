"""Errors that carry the exit code and the one line a user sees."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_GATE = 3
EXIT_INTERRUPTED = 130


class TlcliError(Exception):
    """A failure reported to the user as one line, with an exit code."""

    exit_code = EXIT_FAILURE


class UsageError(TlcliError):
    """Bad usage or bad input: exit 2."""

    exit_code = EXIT_USAGE


class GateError(TlcliError):
    """A quality gate was not met: exit 3."""

    exit_code = EXIT_GATE
