"""saddle: min over x of max over y of f(x, y) = (x1**2 + y1**2) - (x2**2 + y2**2), both by
GradBench's gradient-descent solver from the given start, the inner argmax nested in the outer
argmin's objective (the outer gradient goes through the inner solver's iterations); then the
argmax for the x found. Output: x and y concatenated.

The solver is a fixed-count loop (examples/gradbench/_descent.py). ``grad`` inside an expression is
reverse mode, so the four variants GradBench names by mode (ff, fr, rf, rr) are the same program.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from examples.gradbench import DTYPE, Evaluate
from examples.gradbench._descent import argmin
from service.client import Client

# Iterations of each solver: from (1, 1) GradBench's solvers finish in 170 (eta starts at 1e-5
# and doubles every 10 accepted steps); a start further out needs a few more doublings.
STEPS = 200


def program(steps: int = STEPS) -> tuple[dict[str, Any], str]:
    functions: dict[str, Any] = {
        # the inner problem: the argmax over p of f(p1, p), as an argmin of -f
        "neg_f": {"params": ["p", "p1"], "body": "-(sum(p1 ** 2) - sum(p ** 2))"},
    }
    inner, inner_call = argmin("inner", "neg_f", 2, steps, ["p1"])
    functions |= inner
    functions["argmax_y"] = {"params": ["p1", "s"], "body": inner_call.format(start="s", args=", p1")}
    # the outer objective: f at (p1, the inner argmax), differentiated through the inner solver
    functions["r1_cost"] = {"params": ["p1", "s"], "body": "sum(p1 ** 2) - sum(argmax_y(p1, s)[0:2] ** 2)"}
    outer, outer_call = argmin("outer", "r1_cost", 2, steps, ["s"])
    functions |= outer
    functions["both"] = {"params": ["r1", "s"], "body": "concatenate([r1, argmax_y(r1[0:2], s)])"}
    # [outer state (8), inner state at its x (8)]: x = [0:2], y = [8:10], running flags [7], [15]
    return functions, f"both({outer_call.format(start='start', args=', start')}, start)"


def solve(client: Client, input: Mapping[str, Any]) -> list[float]:
    functions, expression = program()
    start = np.asarray(input["start"], dtype=np.float64)
    state = np.asarray(
        client.compute(expression, {"start": start}, functions=functions, derivatives=(), dtype=DTYPE).value
    )
    if state[7] or state[15]:
        raise RuntimeError(f"the solver did not finish within {STEPS} iterations")
    out: list[float] = np.concatenate([state[0:2], state[8:10]]).tolist()
    return out


FUNCTIONS: Mapping[str, Evaluate] = {"ff": solve, "fr": solve, "rf": solve, "rr": solve}
