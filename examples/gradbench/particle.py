"""particle: the control w for which a charged particle, pushed by the field of charges at (10, 10 - w)
and (10, 0), crosses the x axis at the origin: argmin over w of x0(t_f)**2, by GradBench's
gradient-descent solver, where the trajectory is naive Euler integration (dt = 0.1) of the force
-grad p(x; w) until the particle would cross the axis, then a linear step to it.

So ``grad`` appears twice nested: the force inside each Euler step, and the solver's gradient of
the whole integration with respect to w (through the loop). Euler integration is a fixed-count
``fori`` whose state stops changing once the particle would cross (its "flying" flag); the solver
is examples/gradbench/_descent.py. ``grad`` inside expressions is reverse mode, so GradBench's four
mode variants (ff, fr, rf, rr) are the same program.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from examples.gradbench import DTYPE, Evaluate
from examples.gradbench._descent import argmin
from service.client import Client

# From w = 0 the particle crosses after ~355 Euler steps and the solver finishes in 92 iterations.
EULER_STEPS = 420
SOLVER_STEPS = 120


def program(euler_steps: int = EULER_STEPS, solver_steps: int = SOLVER_STEPS) -> tuple[dict[str, Any], str]:
    functions: dict[str, Any] = {
        "potential": {
            "params": ["x", "w"],
            "body": "1 / norm(x - stack([10.0, 10.0 - w])) + 1 / norm(x - stack([10.0, 0.0]))",
        },
        # state [x (2), velocity (2), flying]: move unless the next position is below the axis
        "euler_move": {
            "params": ["st", "w", "xn"],
            "body": "where(st[4] > 0.5 and xn[1] > 0,"
            " concatenate([xn, st[2:4] - 0.1 * grad(potential, st[0:2], w), [1.0]]),"
            " concatenate([st[0:4], [0.0]]))",
        },
        "euler_step": {"params": ["i", "st", "w"], "body": "euler_move(st, w, st[0:2] + 0.1 * st[2:4])"},
        # the last position before the axis, moved along the velocity to y = 0: x0 there, squared
        "landing": {"params": ["st"], "body": "(st[0] - st[1] / st[3] * st[2]) ** 2"},
        "miss": {
            "params": ["wv"],
            "body": f"landing(fori({euler_steps}, euler_step, [0.0, 8.0, 0.75, 0.0, 1.0], wv[0]))",
        },
        "flying": {
            "params": ["w"],
            "body": f"fori({euler_steps}, euler_step, [0.0, 8.0, 0.75, 0.0, 1.0], w)[4]",
        },
    }
    solver, call = argmin("solver", "miss", 1, solver_steps, [])
    functions |= solver
    # [solver state (6): w = [0], running = [5]; whether the final trajectory was still flying = [6]]
    return functions, f"concatenate([{call.format(start='w0', args='')}, reshape(flying(w0[0]), (1,))])"


def solve(client: Client, input: Mapping[str, Any]) -> float:
    functions, expression = program()
    w0 = np.array([float(input["w"])])
    state = np.asarray(
        client.compute(expression, {"w0": w0}, functions=functions, derivatives=(), dtype=DTYPE).value
    )
    if state[5]:
        raise RuntimeError(f"the solver did not finish within {SOLVER_STEPS} iterations")
    if state[6]:
        raise RuntimeError(f"the particle did not reach the axis within {EULER_STEPS} Euler steps")
    return float(state[0])


FUNCTIONS: Mapping[str, Evaluate] = {"ff": solve, "fr": solve, "rf": solve, "rr": solve}
