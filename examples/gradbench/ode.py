"""ode: s steps of classical Runge-Kutta on y0' = x0, yi' = xi y(i-1), y(0) = 0, up to t = 2.

The primal is y(2) (n values); the gradient is that of its last element with respect to x. The s
steps are one ``fori`` loop (the step traced once, whatever s is); each stage's slope is passed to
the next as an argument, so every slope is computed once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from examples.gradbench import DTYPE, Evaluate
from service.client import Client


def functions(s: int) -> dict[str, dict[str, Any]]:
    h = f"{2.0 / s!r}"  # the step: t from 0 to 2 in s steps
    return {
        "slope": {"params": ["x", "y"], "body": "concatenate([x[0:1], x[1:] * y[:-1]])"},
        "stage4": {
            "params": ["y", "x", "k1", "k2", "k3"],
            "body": f"y + {h} * (k1 + 2 * k2 + 2 * k3 + slope(x, y + {h} * k3)) / 6",
        },
        "stage3": {
            "params": ["y", "x", "k1", "k2"],
            "body": f"stage4(y, x, k1, k2, slope(x, y + {h} * k2 / 2))",
        },
        "stage2": {"params": ["y", "x", "k1"], "body": f"stage3(y, x, k1, slope(x, y + {h} * k1 / 2))"},
        "rk4": {"params": ["i", "y", "x"], "body": "stage2(y, x, slope(x, y))"},
    }


def expression(s: int) -> str:
    if s < 1:
        raise ValueError("ode needs at least one step")
    return f"fori({s}, rk4, zeros_like(x), x)"


def primal(client: Client, input: Mapping[str, Any]) -> list[float]:
    s, x = int(input["s"]), np.asarray(input["x"], dtype=np.float64)
    result = client.compute(expression(s), {"x": x}, functions=functions(s), derivatives=(), dtype=DTYPE)
    out: list[float] = np.asarray(result.value).tolist()
    return out


def gradient(client: Client, input: Mapping[str, Any]) -> list[float]:
    s, x = int(input["s"]), np.asarray(input["x"], dtype=np.float64)
    result = client.gradient(f"{expression(s)}[-1]", {"x": x}, functions=functions(s), dtype=DTYPE)
    out: list[float] = result["x"].tolist()
    return out


FUNCTIONS: Mapping[str, Evaluate] = {"primal": primal, "gradient": gradient}
