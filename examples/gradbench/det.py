"""det: the determinant of an ell x ell matrix (row-major in ``A``) and its gradient.

GradBench's reference expands by minors; the value is the same determinant, which tapeserve's
``det`` computes by LU decomposition (expansion by minors is O(ell!) work and a recursion the
language cannot write). The gradient is TF's: det(A) * inv(A).T.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from examples.gradbench import DTYPE, Evaluate
from service.client import Client

EXPRESSION = "det(A)"


def variables(input: Mapping[str, Any]) -> dict[str, np.ndarray]:
    ell = int(input["ell"])
    return {"A": np.asarray(input["A"], dtype=np.float64).reshape(ell, ell)}


def primal(client: Client, input: Mapping[str, Any]) -> float:
    return float(client.compute(EXPRESSION, variables(input), derivatives=(), dtype=DTYPE).value)


def gradient(client: Client, input: Mapping[str, Any]) -> list[float]:
    result: list[float] = client.gradient(EXPRESSION, variables(input), dtype=DTYPE)["A"].ravel().tolist()
    return result


FUNCTIONS: Mapping[str, Evaluate] = {"primal": primal, "gradient": gradient}
