"""Small straight-line programs run without Grappler (service/engine/programs.py, without_grappler).

Such a program answers the closed form, the calling thread's function call options are what they
were after every call (also a failing one), a failing call gives the optimized program's error,
and programs with graph loops or large inputs keep Grappler.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.eager import context

from service.engine import runner
from service.engine.programs import without_grappler
from service.jobs import GradientJob
from service.limits import Limits
from tests.tolerances import CLOSED_FORM, assert_close

ROSEN = "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)"


def compiled(expression: str, x: np.ndarray, **job: Any) -> runner.TapeProgram:
    job = {"derivatives": ("gradient", "hessian"), "dtype": "float64", **job}
    return runner._compile(GradientJob(expression, {"x": x}, **job), Limits())


def rosen_gradient_and_hessian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = x.size
    g = np.zeros(n)
    g[:-1] += -400 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2 * (1 - x[:-1])
    g[1:] += 200 * (x[1:] - x[:-1] ** 2)
    h = np.zeros((n, n))
    for i in range(n - 1):
        h[i, i] += 1200 * x[i] ** 2 - 400 * x[i + 1] + 2
        h[i, i + 1] = h[i + 1, i] = -400 * x[i]
        h[i + 1, i + 1] += 200
    return g, h


def test_a_small_program_runs_without_grappler_and_answers_the_closed_form() -> None:
    x = np.linspace(-1.0, 2.0, 10)
    program = compiled(ROSEN, x)
    assert program.call.__name__ == "call_without_grappler"
    out = dict(zip(program.outputs, program.call(tf.constant(x)), strict=True))
    g, h = rosen_gradient_and_hessian(x)
    assert_close(out["gradient/x"].numpy(), g, CLOSED_FORM.scaled(g), "gradient")
    assert_close(out["hessian/x/x"].numpy(), h, CLOSED_FORM.scaled(h), "hessian")


def test_the_threads_call_options_are_restored_after_a_call_and_after_a_failure() -> None:
    ctx = context.context()
    before = ctx.function_call_options
    compiled(ROSEN, np.ones(10)).call(tf.constant(np.ones(10)))
    assert ctx.function_call_options is before
    options_seen = []

    def failing(*args: Any) -> Any:
        options_seen.append(ctx.function_call_options)
        raise tf.errors.InvalidArgumentError(None, None, f"failure {len(options_seen)}")

    with pytest.raises(tf.errors.InvalidArgumentError, match="failure 2"):
        without_grappler(failing)()
    # The failing call ran once without Grappler, then again with the thread's own options.
    assert options_seen[0] is not before and options_seen[1] is before
    assert ctx.function_call_options is before


@pytest.mark.parametrize(
    ("expression", "size"),
    [("sum(fori(3, half, x))", 10), ("sum(x**2)", 70_000)],
    ids=["graph loop", "large input"],
)
def test_loops_and_large_programs_keep_grappler(expression: str, size: int) -> None:
    half = {"half": {"params": ["i", "c"], "body": "0.5 * c"}}
    program = compiled(expression, np.ones(size), derivatives=("gradient",), functions=half)
    assert program.call.__name__ != "call_without_grappler"
