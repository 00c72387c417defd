"""The ``tapeserve`` command: ``serve`` runs the server; ``grad``, ``train``, ``functions`` and ``health``
talk to one through ``service.client`` (they never import the server or TensorFlow).

    serve.py      the server launcher: checks the server's modules are installed before importing them
    commands.py   the client commands: options in, one SDK call, the SDK's result handed to output
    inputs.py     command-line values and files as arrays (tensors, NAME=VALUE, spec and data files)
    output.py     how results are shown: tables (rich when installed, plain text otherwise) or JSON
    exits.py      exit codes and the usage error

Exit codes: 0 success, 1 the API answered with an error (its problem message on stderr), 2 bad
usage or configuration, 3 the server could not be reached or did not answer in time.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from service.cli.commands import add_client_commands
from service.cli.serve import add_serve_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapeserve",
        description="Exact derivatives of expressions with tf.GradientTape, over HTTP.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_command(commands)
    add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tapeserve`` console script."""
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code
