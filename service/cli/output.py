"""How the client commands show the SDK's results: a table (through rich when it is installed, the
`cli` extra; plain aligned text otherwise) or, with --json, JSON for scripts with tensors in the API's
JSON form. Messages and problems go to stderr, so stdout holds only the result."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.client import (
        Derivatives,
        FunctionInfo,
        Functions,
        Readiness,
        TrainingRun,
        TrainProgress,
        TrainResult,
    )

__all__ = ["Output", "wire_json"]


def wire_json(value: Any) -> Any:
    """Arrays and numbers (also inside dicts and lists) in the API's JSON tensor form: nested lists,
    non-finite numbers as "NaN"/"Infinity" strings."""
    if isinstance(value, dict):
        return {key: wire_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [wire_json(item) for item in value]
    from service.tensorcodec import encode_tensor

    return encode_tensor(value, "json")


def format_array(array: Any) -> str:
    import numpy as np

    return np.array2string(np.asarray(array), precision=8, separator=", ", max_line_width=100)


class Output:
    """Where a command's results, messages and progress go, and in which form (tables or --json)."""

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

    # -- the forms -------------------------------------------------------------------------------------

    def json(self, data: Any) -> None:
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
            print(json.dumps(problem, indent=2), file=sys.stderr)
        else:
            print(f"tapeserve: {message}", file=sys.stderr)

    # -- the results -----------------------------------------------------------------------------------

    def derivatives(self, result: Derivatives, expression: str, order_variable: str) -> None:
        """``tapeserve grad``: value and derivatives; ``order_variable`` labels the k-th derivatives."""
        if self.json_mode:
            body: dict[str, Any] = {"value": wire_json(result.value)}
            for name in ("gradient", "jacobian", "hessian", "derivatives"):  # the SDK's field names
                block = getattr(result, name)
                if block is not None:
                    body[name] = wire_json(block)
            body["dtype"] = result.dtype
            meta = result.meta
            body["meta"] = {"cache": meta.cache, "compute_ms": meta.compute_ms, "executor": meta.executor}
            self.json(body)
            return
        rows = [["value", "", format_array(result.value)]]
        for name in ("gradient", "jacobian"):
            for var, array in (getattr(result, name) or {}).items():
                rows.append([name, var, format_array(array)])
        for a, row in (result.hessian or {}).items():
            for b, array in row.items():
                rows.append(["hessian", f"{a}, {b}", format_array(array)])
        for i, array in enumerate(result.derivatives or [], start=1):
            rows.append([f"derivative {i}", order_variable, format_array(array)])
        meta = result.meta
        how = f"{result.dtype}, cache {meta.cache}, {meta.executor}, {meta.compute_ms:.1f} ms"
        self.table(f"{expression}  ({how})", ["what", "variable", "result"], rows)

    def training(self, result: TrainResult, first_loss: float | None, saved_to: str | None) -> None:
        """``tapeserve train``: the last step's numbers, the weights' shapes, where they were saved."""
        if self.json_mode:
            self.json(
                {
                    "steps": result.steps,
                    "loss": wire_json(result.loss),
                    "data_loss": wire_json(result.data_loss),
                    "regularization_loss": wire_json(result.regularization_loss),
                    "gradient_norm": wire_json(result.gradient_norm),
                    "first_loss": None if first_loss is None else wire_json(first_loss),
                    "weights": [list(w.shape) for w in result.weights],
                    "out": saved_to,
                }
            )
            return
        rows = [
            ["steps", str(result.steps)],
            ["loss (first reported)", "-" if first_loss is None else f"{first_loss:.6g}"],
            ["loss (last step)", f"{result.loss:.6g}"],
            ["data / regularization", f"{result.data_loss:.6g} / {result.regularization_loss:.6g}"],
            ["gradient norm (clipped)", f"{result.gradient_norm:.6g} ({result.clipped_gradient_norm:.6g})"],
            ["weights", ", ".join(str(list(w.shape)) for w in result.weights)],
        ]
        if saved_to:
            rows.append(["saved to", saved_to])
        self.table("Training", ["", ""], rows)

    def functions(self, reference: Functions, listed: Sequence[FunctionInfo], everything: bool) -> None:
        """``tapeserve functions``: the listed built-ins; with ``everything``, constants and syntax too."""
        if self.json_mode:
            self.json(
                {
                    "functions": [dataclasses.asdict(f) for f in listed],
                    "constants": [{"name": c.name, "value": wire_json(c.value)} for c in reference.constants],
                    "syntax": reference.syntax,
                }
            )
            return
        self.table(
            "Functions",
            ["function", "category", "what it does"],
            [[f.signature, f.category, f.doc] for f in listed],
        )
        if everything:
            self.text("constants: " + ", ".join(f"{c.name} = {c.value:g}" for c in reference.constants))
            for line in reference.syntax:
                self.text(f"  {line}")

    def health(self, url: str, alive: dict[str, Any], readiness: Readiness) -> None:
        """``tapeserve health``: liveness, readiness and the pool's status."""
        if self.json_mode:
            self.json({"liveness": alive, "readiness": {"status": readiness.status, "pool": readiness.pool}})
            return
        rows = [["url", url], ["alive", str(alive.get("status"))], ["ready", readiness.status]]
        rows += [[f"pool.{key}", str(value)] for key, value in readiness.pool.items()]
        self.table("Health", ["check", "state"], rows)

    def progress(self, run: TrainingRun, steps: int) -> Iterator[TrainProgress]:
        """Yield the run's progress while drawing it on stderr: a rich bar, or a plain line per 10%."""
        if self.json_mode:
            yield from run
            return
        if self.err_console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            columns = (
                TextColumn("training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeRemainingColumn(),
            )
            with Progress(*columns, console=self.err_console, transient=False) as bar:
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
