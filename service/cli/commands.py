"""The client commands, ``grad``, ``train``, ``functions`` and ``health``: each reads its options,
makes one call through ``service.client`` and hands the SDK's result to ``output``. The SDK is
imported when a command runs, so ``tapeserve serve`` and ``--help`` never load it; nothing here
imports the server or TensorFlow."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from service.cli.exits import EXIT_API_ERROR, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, UsageError
from service.cli.inputs import load_train_inputs, parse_assignments
from service.cli.output import Output

if TYPE_CHECKING:
    from service.client import Client

__all__ = ["add_client_commands"]

ClientCommand = Callable[["Client", argparse.Namespace, Output], int]


def add_client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    _add_client_options(grad, _grad)

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
    _add_client_options(train, _train)

    functions = commands.add_parser(
        "functions", help="list the expression language's functions", description="List the built-ins."
    )
    functions.add_argument("--category", help="only this category (elementwise, reduction, linalg...)")
    _add_client_options(functions, _functions)

    health = commands.add_parser(
        "health",
        help="liveness and readiness of a server",
        description="Ask a server whether it is alive and ready. Exits 0 when ready, 1 when alive but "
        "not ready yet, 3 when unreachable.",
    )
    _add_client_options(health, _health)


def _add_client_options(command: argparse.ArgumentParser, run: ClientCommand) -> None:
    """The options every client command shares, and its handler."""
    command.add_argument("--url", help="server URL (TAPESERVE_URL, default http://127.0.0.1:8000)")
    command.add_argument("--api-key", help="API key, sent as Authorization: Bearer (TAPESERVE_API_KEY)")
    command.add_argument("--timeout", type=float, help="seconds to wait for an answer (default 60)")
    command.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")
    command.set_defaults(handler=_client_command(run))


def _client_command(run: ClientCommand) -> Callable[[argparse.Namespace], int]:
    """Wrap a client command: build the Client, turn every failure into a message and an exit code."""

    def handler(args: argparse.Namespace) -> int:
        from service.client import APIError, Client, TapeserveError, TransportError

        out = Output(json_mode=args.json)
        try:
            with Client(args.url, api_key=args.api_key, timeout=args.timeout) as client:
                return run(client, args, out)
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


def _grad(client: Client, args: argparse.Namespace, out: Output) -> int:
    variables = parse_assignments(args.var, "--var")
    constants = parse_assignments(args.const, "--const")
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
    # --order takes one variable: the --wrt one, else the only one given.
    out.derivatives(result, args.expression, order_variable=(args.wrt or list(variables) or [""])[0])
    return EXIT_OK


def _train(client: Client, args: argparse.Namespace, out: Output) -> int:
    import numpy as np

    if args.steps < 1:
        raise UsageError("--steps must be at least 1")
    template, x, y = load_train_inputs(args.spec, args.data)
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
    for progress in out.progress(run, args.steps):
        first_loss = progress.loss if first_loss is None else first_loss
    result = run.result
    assert result is not None  # iterating the run raises DecodingError when the stream has no result
    if args.out:
        arrays: dict[str, Any] = {f"weight_{i}": w for i, w in enumerate(result.weights)}
        arrays.update({f"optimizer_state_{i}": s for i, s in enumerate(result.optimizer_state)})
        np.savez(args.out, **arrays)
    out.training(result, first_loss, saved_to=args.out)
    return EXIT_OK


def _functions(client: Client, args: argparse.Namespace, out: Output) -> int:
    reference = client.functions()
    listed = [f for f in reference.functions if args.category in (None, f.category)]
    if args.category is not None and not listed:
        categories = sorted({f.category for f in reference.functions})
        raise UsageError(f"no category {args.category!r}; categories: {', '.join(categories)}")
    out.functions(reference, listed, everything=args.category is None)
    return EXIT_OK


def _health(client: Client, args: argparse.Namespace, out: Output) -> int:
    alive = client.health()
    readiness = client.ready()
    out.health(client.base_url, alive, readiness)
    return EXIT_OK if readiness.ready else EXIT_API_ERROR
