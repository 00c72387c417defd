"""lse: LogSumExp of a vector and its gradient, written with its primitives (max, exp, sum, log).

The maximum is held out of the gradient with ``stop_gradient``: LSE(x) = a + log(sum(exp(x - a)))
for any constant a, so the derivative through a is exactly zero and need not be traced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from examples.gradbench import DTYPE, Evaluate
from service.client import Client

EXPRESSION = "stop_gradient(max(x)) + log(sum(exp(x - stop_gradient(max(x)))))"


def variables(input: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {"x": np.asarray(input["x"], dtype=np.float64)}


def primal(client: Client, input: Mapping[str, Any]) -> float:
    return float(client.compute(EXPRESSION, variables(input), derivatives=(), dtype=DTYPE).value)


def gradient(client: Client, input: Mapping[str, Any]) -> list[float]:
    result: list[float] = client.gradient(EXPRESSION, variables(input), dtype=DTYPE)["x"].tolist()
    return result


FUNCTIONS: Mapping[str, Evaluate] = {"primal": primal, "gradient": gradient}
