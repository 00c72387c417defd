"""``tapeserve serve``: run the HTTP server. The server's modules are looked for before any is
imported, so a client-only install answers with the line that adds the server, not a traceback."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from typing import Any

from service.cli.exits import EXIT_OK, EXIT_USAGE

__all__ = ["add_serve_command", "missing_server_modules", "serve", "server_extra_hint"]

# What `serve` imports, by module, and the extras that provide them: a client-only install (the base
# package or tapeserve[cli]) has none of them.
_SERVER_MODULES = ("uvicorn", "fastapi", "pydantic_settings", "orjson", "yaml", "prometheus_client", "redis")
_WORKER_MODULES = ("tensorflow",)


def add_serve_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve_parser = commands.add_parser(
        "serve",
        help="run the HTTP server",
        description="Run the HTTP server. Every other setting comes from TAPESERVE_* environment "
        "variables (see docs/configuration.md); these options override them.",
    )
    serve_parser.add_argument("--host", help="interface to listen on (TAPESERVE_HOST, default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, help="TCP port (TAPESERVE_PORT, default 8000)")
    serve_parser.add_argument(
        "--workers", type=int, help="worker processes (TAPESERVE_WORKERS, default automatic)"
    )
    serve_parser.add_argument("--devices", help='"cpu" or GPU ids such as "0,1" (TAPESERVE_DEVICES)')
    serve_parser.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (TAPESERVE_LOG_LEVEL, default info)",
    )
    serve_parser.set_defaults(handler=serve)


def missing_server_modules() -> list[str]:
    """The server's modules this environment lacks (find_spec: nothing is imported)."""
    return [name for name in (*_SERVER_MODULES, *_WORKER_MODULES) if importlib.util.find_spec(name) is None]


def server_extra_hint() -> str:
    """How to add the server to this install: the README's install line for this version's wheel."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        wheel = f"dist/tapeserve-{version('tapeserve')}-py3-none-any.whl"
    except PackageNotFoundError:  # running from a checkout that was never installed
        wheel = "tapeserve"
    return f"pip install '{wheel}[server]'"


def serve(args: argparse.Namespace) -> int:
    missing = missing_server_modules()
    if missing:
        print(
            f"tapeserve serve: the server is not installed here (missing: {', '.join(missing)}); "
            "install tapeserve with its server extra (CPU TensorFlow; [gpu] for the CUDA build):\n"
            f"  {server_extra_hint()}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    # Imported here so client commands never pay for (or need) the server's dependencies.
    import uvicorn
    from pydantic import ValidationError

    from service.api import Settings, create_app
    from service.api.offload import keep_the_loop_responsive

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
        return EXIT_USAGE
    from service.api.logging import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    # Here rather than in create_app: it freezes the garbage collector's view of this process, which
    # is right for a server that just started and wrong for a test process that builds many apps.
    keep_the_loop_responsive()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Logging is configured above (JSON or text); our access line carries the route and request id.
        log_config=None,
        access_log=False,
        # uvloop and httptools when installed (uvicorn[standard]), else asyncio and h11.
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        # Client addresses (rate-limit buckets without keys, logs) come from X-Forwarded-For only when
        # the peer is one of the trusted balancers; unset, the headers are ignored.
        proxy_headers=settings.forwarded_allow_ips is not None,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        server_header=False,
    )
    return EXIT_OK
