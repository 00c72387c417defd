"""The ``tapeserve`` command: ``serve`` runs the server; ``grad``, ``train``, ``functions`` and ``health``
talk to one through ``service.client`` (they never import the server or TensorFlow).

Exit codes: 0 success, 1 the API answered with an error (its problem message on stderr), 2 bad
usage or configuration, 3 the server could not be reached or did not answer in time.
"""

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
    _add_client_commands(commands)
    return parser


# What `serve` imports, by module, and the extras that provide them: a client-only install (the base
# package or tapeserve[cli]) has none of them.
_SERVER_MODULES = ("uvicorn", "fastapi", "pydantic_settings", "orjson", "yaml", "prometheus_client", "redis")
_WORKER_MODULES = ("tensorflow",)


def _missing_server_modules() -> list[str]:
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


def _serve(args: argparse.Namespace) -> int:
    missing = _missing_server_modules()
    if missing:
        print(
            f"tapeserve serve: the server is not installed here (missing: {', '.join(missing)}); "
            "install tapeserve with its server extra (CPU TensorFlow; [gpu] for the CUDA build):\n"
            f"  {server_extra_hint()}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    # Imported here so client subcommands never pay for (or need) the server's dependencies.
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
        return 2
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
    return 0


# -- client commands -------------------------------------------------------------------------------

# Exit codes of the client commands (argparse itself exits with 2 on bad usage).
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class UsageError(Exception):
    """A command-line value the command cannot use (exit 2, like argparse)."""


def _add_client_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--url", help="server URL (TAPESERVE_URL, default http://127.0.0.1:8000)")
    command.add_argument("--api-key", help="API key, sent as Authorization: Bearer (TAPESERVE_API_KEY)")
    command.add_argument("--timeout", type=float, help="seconds to wait for an answer (default 60)")
    command.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")


def _add_client_commands(commands: Any) -> None:
    grad = commands.add_parser(
        "grad",
        help="value and derivatives of an expression",
        description="Evaluate an expression on a server and print its value and derivatives, e.g. "
        "tapeserve grad 'sum(x**2)' --var x=1,2,3 --hessian",
    )
    grad.add_argument("expression", help="the expression, e.g. 'sum(x**2)' (see `tapeserve functions`)")
    grad.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a variable: 3 (scalar), 1,2,3 (vector), [[1,2],[3,4]] (JSON), or @file.npy; repeatable",
    )
    grad.add_argument(
        "--const", action="append", default=[], metavar="NAME=VALUE", help="a constant (not differentiated)"
    )
    grad.add_argument("--wrt", action="append", metavar="NAME", help="differentiate only w.r.t. NAME")
    grad.add_argument("--no-gradient", action="store_true", help="do not ask for the gradient")
    grad.add_argument("--jacobian", action="store_true", help="also the Jacobian")
    grad.add_argument("--hessian", action="store_true", help="also the Hessian")
    grad.add_argument("--order", type=int, metavar="K", help="also the 1st..K-th derivatives (one variable)")
    grad.add_argument(
        "--dtype", choices=["float32", "float64"], help="computation dtype (server default float32)"
    )
    _add_client_options(grad)
    grad.set_defaults(handler=_client_command(_grad))

    train = commands.add_parser(
        "train",
        help="train a model spec on data, with a progress bar",
        description="Run training steps of a model on a server (POST /v1/model/train-step, streamed). "
        "SPEC is a JSON file: a model spec, or a request template with model, optimizer, loss, clip, "
        "objective. DATA is an .npz file with arrays x and y.",
    )
    train.add_argument("spec", help="JSON file: a model spec or a train-step request template")
    train.add_argument("--data", required=True, help=".npz file with arrays x and y")
    train.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    train.add_argument("--optimizer", help="optimizer type, e.g. adam (default: the template's, else sgd)")
    train.add_argument("--lr", type=float, help="learning rate (default: the template's, else 0.01)")
    train.add_argument("--loss", help="loss, e.g. mse (default: the template's, else mse)")
    train.add_argument("--seed", type=int, help="seed of the initial weights")
    train.add_argument(
        "--every", type=int, help="a progress line every N steps (default: about 100 lines per run)"
    )
    train.add_argument("--out", help="write the trained weights (and optimizer state) to this .npz file")
    _add_client_options(train)
    train.set_defaults(handler=_client_command(_train))

    functions = commands.add_parser(
        "functions", help="list the expression language's functions", description="List the built-ins."
    )
    functions.add_argument("--category", help="only this category (elementwise, reduction, linalg...)")
    _add_client_options(functions)
    functions.set_defaults(handler=_client_command(_functions))

    health = commands.add_parser(
        "health",
        help="liveness and readiness of a server",
        description="Ask a server whether it is alive and ready. Exits 0 when ready, 1 when alive but "
        "not ready yet, 3 when unreachable.",
    )
    _add_client_options(health)
    health.set_defaults(handler=_client_command(_health))


def _client_command(run: Any) -> Any:
    """Wrap a client command: build the Client, turn every failure into a message and an exit code."""

    def handler(args: argparse.Namespace) -> int:
        from service.client import APIError, Client, TapeserveError, TransportError

        out = _Output(json_mode=args.json)
        try:
            with Client(args.url, api_key=args.api_key, timeout=args.timeout) as client:
                code: int = run(client, args, out)
                return code
        except UsageError as error:
            out.error(f"tapeserve {args.command}: {error}")
            return EXIT_USAGE
        except APIError as error:
            out.problem(error.problem, str(error))
            return EXIT_API_ERROR
        except TransportError as error:
            out.error(f"tapeserve: {error}")
            return EXIT_UNREACHABLE
        except TapeserveError as error:
            out.error(f"tapeserve: {error}")
            return EXIT_API_ERROR

    return handler


class _Output:
    """Tables through rich when it is installed (the `cli` extra), plain aligned text otherwise."""

    def __init__(self, *, json_mode: bool) -> None:
        self.json_mode = json_mode
        try:
            import rich.console
        except ImportError:  # the client's own dependencies do not include rich
            self.console: Any = None
            self.err_console: Any = None
        else:
            self.console = rich.console.Console(soft_wrap=True)
            self.err_console = rich.console.Console(stderr=True, soft_wrap=True)

    def json(self, data: Any) -> None:
        import json

        print(json.dumps(data, indent=2, allow_nan=False))

    def text(self, line: str) -> None:
        if self.console is not None:
            self.console.print(line, markup=False, highlight=False)
        else:
            print(line)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if self.console is not None:
            from rich.table import Table

            table = Table(title=title, title_justify="left")
            for column in columns:
                table.add_column(column, overflow="fold")
            for row in rows:
                table.add_row(*row)
            self.console.print(table, markup=False, highlight=False)
            return
        widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
        for row in rows:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())

    def error(self, message: str) -> None:
        print(message, file=sys.stderr)

    def problem(self, problem: dict[str, Any], message: str) -> None:
        """An API error: the problem body with --json, else "tapeserve: code: detail" and the caret."""
        if self.json_mode:
            import json

            print(json.dumps(problem, indent=2), file=sys.stderr)
        else:
            print(f"tapeserve: {message}", file=sys.stderr)


def _parse_tensor(text: str, what: str) -> Any:
    """A command-line tensor: 3, 1,2,3, JSON nested lists (NaN/Infinity allowed), or @file.npy."""
    import json

    import numpy as np

    text = text.strip()
    if text.startswith("@"):
        try:
            return np.load(text[1:], allow_pickle=False)  # never pickles: a file is data, not code
        except (OSError, ValueError) as error:
            raise UsageError(f"{what}: cannot read {text[1:]}: {error}") from None
    try:
        if text.startswith("["):
            value = json.loads(text, parse_constant=float)
            return np.array(value, dtype=np.float64)
        if "," in text:
            return np.array([float(item) for item in text.split(",") if item.strip()], dtype=np.float64)
        return np.float64(float(text))
    except (ValueError, TypeError) as error:
        raise UsageError(
            f"{what}: {text!r} is not a tensor (write 3, 1,2,3, [[1,2],[3,4]] or @file.npy): {error}"
        ) from None


def _parse_assignments(items: Sequence[str], option: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"{option} {item!r}: write NAME=VALUE, e.g. {option} x=1,2,3")
        if name in values:
            raise UsageError(f"{option}: {name} is given twice")
        values[name] = _parse_tensor(value, f"{option} {name}")
    return values


def _format_array(array: Any) -> str:
    import numpy as np

    return np.array2string(np.asarray(array), precision=8, separator=", ", max_line_width=100)


def _wire_json(array: Any) -> Any:
    from service.tensorcodec import encode_tensor

    return encode_tensor(array, "json")


def _grad(client: Any, args: argparse.Namespace, out: _Output) -> int:
    variables = _parse_assignments(args.var, "--var")
    constants = _parse_assignments(args.const, "--const")
    derivatives = [] if args.no_gradient else ["gradient"]
    derivatives += [name for name in ("jacobian", "hessian") if getattr(args, name)]
    result = client.compute(
        args.expression,
        variables,
        derivatives=derivatives,
        constants=constants,
        wrt=args.wrt,
        order=args.order,
        dtype=args.dtype,
    )
    if args.json:
        body: dict[str, Any] = {"value": _wire_json(result.value)}
        for name in ("gradient", "jacobian"):
            block = getattr(result, name)
            if block is not None:
                body[name] = {k: _wire_json(v) for k, v in block.items()}
        if result.hessian is not None:
            body["hessian"] = {
                a: {b: _wire_json(v) for b, v in row.items()} for a, row in result.hessian.items()
            }
        if result.derivatives is not None:
            body["derivatives"] = [_wire_json(d) for d in result.derivatives]
        body["dtype"] = result.dtype
        body["meta"] = {
            "cache": result.meta.cache,
            "compute_ms": result.meta.compute_ms,
            "executor": result.meta.executor,
        }
        out.json(body)
        return 0
    rows = [["value", "", _format_array(result.value)]]
    for name in ("gradient", "jacobian"):
        for var, array in (getattr(result, name) or {}).items():
            rows.append([name, var, _format_array(array)])
    for a, row in (result.hessian or {}).items():
        for b, array in row.items():
            rows.append(["hessian", f"{a}, {b}", _format_array(array)])
    for i, array in enumerate(result.derivatives or [], start=1):
        rows.append([f"derivative {i}", (args.wrt or list(variables))[0], _format_array(array)])
    meta = result.meta
    how = f"{result.dtype}, cache {meta.cache}, {meta.executor}, {meta.compute_ms:.1f} ms"
    title = f"{args.expression}  ({how})"
    out.table(title, ["what", "variable", "result"], rows)
    return 0


def _load_train_inputs(args: argparse.Namespace) -> tuple[dict[str, Any], Any, Any]:
    """(request template, x, y) from the spec file and the data file."""
    import json

    import numpy as np

    try:
        with open(args.spec, encoding="utf-8") as handle:
            spec = json.load(handle)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read the spec {args.spec}: {error}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"{args.spec} must hold a JSON object (a model spec or a request template)")
    template = dict(spec) if "model" in spec else {"model": spec}
    try:
        with np.load(args.data, allow_pickle=False) as data:  # data, never pickled code
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read the data {args.data}: {error}") from None
    if "x" not in arrays:
        raise UsageError(f"{args.data} has no array named x (it has: {', '.join(arrays) or 'none'})")
    return template, arrays["x"], arrays.get("y")


def _train(client: Any, args: argparse.Namespace, out: _Output) -> int:
    import numpy as np

    if args.steps < 1:
        raise UsageError("--steps must be at least 1")
    template, x, y = _load_train_inputs(args)
    model = dict(template["model"])
    if args.seed is not None:
        model["seed"] = args.seed
    optimizer = dict(template.get("optimizer") or {"type": "sgd"})
    if args.optimizer is not None:
        optimizer = {"type": args.optimizer}
    if args.lr is not None:
        optimizer["learning_rate"] = args.lr
    run = client.train(
        model,
        x,
        y,
        optimizer=optimizer,
        steps=args.steps,
        progress_every=args.every,  # None: about 100 lines per run
        weights=template.get("weights"),
        loss=args.loss or template.get("loss"),
        clip=template.get("clip"),
        objective=template.get("objective"),
        dtype=template.get("dtype"),
    )
    first_loss: float | None = None
    for progress in _with_progress_bar(run, args.steps, out):
        first_loss = progress.loss if first_loss is None else first_loss
    result = run.result
    if args.out:
        arrays = {f"weight_{i}": w for i, w in enumerate(result.weights)}
        arrays.update({f"optimizer_state_{i}": s for i, s in enumerate(result.optimizer_state)})
        np.savez(args.out, **arrays)
    if args.json:
        out.json(
            {
                "steps": result.steps,
                "loss": _wire_json(result.loss),
                "data_loss": _wire_json(result.data_loss),
                "regularization_loss": _wire_json(result.regularization_loss),
                "gradient_norm": _wire_json(result.gradient_norm),
                "first_loss": None if first_loss is None else _wire_json(first_loss),
                "weights": [list(w.shape) for w in result.weights],
                "out": args.out,
            }
        )
        return 0
    rows = [
        ["steps", str(result.steps)],
        ["loss (first reported)", "-" if first_loss is None else f"{first_loss:.6g}"],
        ["loss (last step)", f"{result.loss:.6g}"],
        ["data / regularization", f"{result.data_loss:.6g} / {result.regularization_loss:.6g}"],
        ["gradient norm (clipped)", f"{result.gradient_norm:.6g} ({result.clipped_gradient_norm:.6g})"],
        ["weights", ", ".join(str(list(w.shape)) for w in result.weights)],
    ]
    if args.out:
        rows.append(["saved to", args.out])
    out.table("Training", ["", ""], rows)
    return 0


def _with_progress_bar(run: Any, steps: int, out: _Output) -> Any:
    """Yield the run's progress while drawing it: a rich bar on stderr, or a plain line per 10%."""
    if out.json_mode:
        yield from run
        return
    if out.err_console is not None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=out.err_console, transient=False) as bar:
            task = bar.add_task("train", total=steps, loss="-")
            for progress in run:
                loss = "-" if progress.loss is None else f"{progress.loss:.6g}"
                bar.update(task, completed=progress.step, loss=loss)
                yield progress
        return
    shown = 0
    for progress in run:
        if progress.step * 10 // steps > shown or progress.step == steps:
            shown = progress.step * 10 // steps
            print(f"step {progress.step}/{steps} loss {progress.loss}", file=sys.stderr)
        yield progress


def _functions(client: Any, args: argparse.Namespace, out: _Output) -> int:
    reference = client.functions()
    listed = [f for f in reference.functions if args.category in (None, f.category)]
    if args.category is not None and not listed:
        categories = sorted({f.category for f in reference.functions})
        raise UsageError(f"no category {args.category!r}; categories: {', '.join(categories)}")
    if args.json:
        out.json(
            {
                "functions": [vars(f) for f in listed],
                "constants": [{"name": c.name, "value": _wire_json(c.value)} for c in reference.constants],
                "syntax": reference.syntax,
            }
        )
        return 0
    out.table(
        "Functions",
        ["function", "category", "what it does"],
        [[f.signature, f.category, f.doc] for f in listed],
    )
    if args.category is None:
        out.text("constants: " + ", ".join(f"{c.name} = {c.value:g}" for c in reference.constants))
        for line in reference.syntax:
            out.text(f"  {line}")
    return 0


def _health(client: Any, args: argparse.Namespace, out: _Output) -> int:
    alive = client.health()
    readiness = client.ready()
    if args.json:
        out.json({"liveness": alive, "readiness": {"status": readiness.status, "pool": readiness.pool}})
    else:
        rows = [["url", client.base_url], ["alive", str(alive.get("status"))], ["ready", readiness.status]]
        rows += [[f"pool.{key}", str(value)] for key, value in readiness.pool.items()]
        out.table("Health", ["check", "state"], rows)
    return 0 if readiness.ready else EXIT_API_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tapeserve`` console script."""
    args = _build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
