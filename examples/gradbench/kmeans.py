"""kmeans: cost(P, C) = sum_i min_j |C_j - P_i|**2, and the Newton direction J / diag(H) ("dir").

The squared distances are expanded (|P|**2 - 2 P C^T + |C|**2) so the largest tensor is the n x k
distance matrix, not n x k x d. H is diagonal, so H @ ones is its diagonal: one request returns the
gradient J and that Hessian-vector product together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from examples.gradbench import DTYPE, Evaluate
from service.client import Client

# |P_i - C_j|**2 for every pair, as an n x k matrix
DISTANCES = "sum(P * P, axis=1)[:, None] - 2 * matmul(P, transpose(C)) + sum(C * C, axis=1)[None, :]"
EXPRESSION = f"sum(min({DISTANCES}, axis=1))"


def inputs(input: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    points = np.asarray(input["points"], dtype=np.float64)
    centroids = np.asarray(input["centroids"], dtype=np.float64)
    return {"C": centroids}, {"P": points}


def cost(client: Client, input: Mapping[str, Any]) -> float:
    variables, constants = inputs(input)
    return float(
        client.compute(EXPRESSION, variables, constants=constants, derivatives=(), dtype=DTYPE).value
    )


def direction(client: Client, input: Mapping[str, Any]) -> list[list[float]]:
    variables, constants = inputs(input)
    result = client.compute(
        EXPRESSION,
        variables,
        constants=constants,
        derivatives=("gradient", "hvp"),
        tangents={"C": np.ones_like(variables["C"])},
        dtype=DTYPE,
    )
    assert result.gradient is not None and result.hvp is not None
    out: list[list[float]] = (result.gradient["C"] / result.hvp["C"]).tolist()
    return out


FUNCTIONS: Mapping[str, Evaluate] = {"cost": cost, "dir": direction}
