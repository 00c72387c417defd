"""The ``tapeserve`` command: ``tapeserve serve`` runs the server (client subcommands come later)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapeserve",
        description="Exact derivatives of expressions with tf.GradientTape, over HTTP.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the HTTP server",
        description="Run the HTTP server. Every other setting comes from TAPESERVE_* environment "
        "variables (see README); these options override them.",
    )
    serve.add_argument("--host", help="interface to listen on (TAPESERVE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (TAPESERVE_PORT, default 8000)")
    serve.add_argument("--workers", type=int, help="worker processes (TAPESERVE_WORKERS, default automatic)")
    serve.add_argument("--devices", help='"cpu" or GPU ids such as "0,1" (TAPESERVE_DEVICES)')
    serve.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (TAPESERVE_LOG_LEVEL, default info)",
    )
    serve.set_defaults(handler=_serve)
    return parser


def _serve(args: argparse.Namespace) -> int:
    # Imported here so client subcommands never pay for (or need) the server's dependencies.
    import uvicorn
    from pydantic import ValidationError

    from service.api import Settings, create_app

    overrides: dict[str, Any] = {
        name: value
        for name in ("host", "port", "workers", "devices", "log_level")
        if (value := getattr(args, name)) is not None
    }
    try:
        settings = Settings(**overrides)
        settings.pool_config()  # resolves devices now: a bad GPU id stops start-up, not a worker later
    except (ValidationError, ValueError) as error:
        print(f"tapeserve: invalid configuration:\n{error}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # uvloop and httptools when installed (uvicorn[standard]), else asyncio and h11.
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        proxy_headers=False,
        server_header=False,
    )
    return 0


def _configure_logging(level: str) -> None:
    """The service's own loggers ("tapeserve.*") write to stderr like uvicorn's do."""
    import logging

    logger = logging.getLogger("tapeserve")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tapeserve`` console script."""
    args = _build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
