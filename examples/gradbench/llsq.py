"""llsq: y(x) = 1/2 sum_i (s_i - sum_j x_j t_i**j)**2, t_i = -1 + 2i/(n-1), s_i = sign(t_i).

t, s and the powers of t are built in the service from n (a literal: one compiled program per n).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from examples.gradbench import DTYPE, Evaluate
from service.client import Client


def expression(n: int, m: int) -> str:
    if n < 2 or m < 1:
        raise ValueError("llsq needs n >= 2 and m >= 1")
    t = f"linspace(-1, 1, {n})"
    # column j of the (n, m) matrix is t**j; 0**0 is 1, as the sum's first term x_0 needs
    powers = f"{t}[:, None] ** arange({m})[None, :]"
    return f"0.5 * sum((sign({t}) - matmul({powers}, x)) ** 2)"


def _call(client: Client, input: Mapping[str, Any], derivatives: tuple[str, ...]) -> Any:
    x = np.asarray(input["x"], dtype=np.float64)
    return client.compute(expression(int(input["n"]), x.size), {"x": x}, derivatives=derivatives, dtype=DTYPE)


def primal(client: Client, input: Mapping[str, Any]) -> float:
    return float(_call(client, input, ()).value)


def gradient(client: Client, input: Mapping[str, Any]) -> list[float]:
    result: list[float] = _call(client, input, ("gradient",)).gradient["x"].tolist()
    return result


FUNCTIONS: Mapping[str, Evaluate] = {"primal": primal, "gradient": gradient}
