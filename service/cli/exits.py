"""Exit codes shared by the commands, and the error a command raises for a value it cannot use."""

from __future__ import annotations

EXIT_OK = 0
EXIT_API_ERROR = 1  # the API answered with an error (its problem message on stderr)
EXIT_USAGE = 2  # bad usage or configuration (argparse exits with 2 too)
EXIT_UNREACHABLE = 3  # the server could not be reached or did not answer in time


class UsageError(Exception):
    """A command-line value the command cannot use (exit 2, like argparse)."""
