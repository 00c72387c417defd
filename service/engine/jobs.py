"""The engine's plain-data jobs and results: numpy arrays and Python values, no TensorFlow.

The API builds jobs, the worker pool carries them to a worker process (numpy buffers travel as
raw bytes), and ``service.engine.execute`` turns each into its result inside the worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DERIVATIVES", "GradientJob", "GradientResult", "Job", "Result"]

DERIVATIVES = ("gradient", "jacobian", "hessian", "hvp", "jvp", "vjp")


@dataclass(slots=True)
class GradientJob:
    """One forward evaluation of an expression and every derivative asked of it."""

    expression: str
    variables: dict[str, np.ndarray]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    # name -> {"params": [...], "body": str, "gradient": {param: str} | None}, in definition order
    functions: dict[str, dict[str, Any]] = field(default_factory=dict)
    derivatives: tuple[str, ...] = ("gradient",)
    wrt: tuple[str, ...] | None = None  # None: every variable
    tangents: dict[str, np.ndarray] = field(default_factory=dict)
    cotangent: np.ndarray | None = None
    order: int | None = None  # k-th derivative of a scalar expression w.r.t. one variable
    batch: bool = False
    dtype: str = "float32"

    def signature(self) -> str:
        """What the compiled program depends on: text, shapes, dtypes and the derivative set."""

        def shapes(arrays: dict[str, np.ndarray]) -> str:
            return ",".join(f"{k}{list(v.shape)}" for k, v in arrays.items())

        return "|".join(
            [
                self.expression,
                repr(list(self.functions.items())),
                shapes(self.variables),
                shapes(self.constants),
                ",".join(sorted(self.derivatives)),
                ",".join(self.wrt) if self.wrt is not None else "*",
                shapes(self.tangents),
                "-" if self.cotangent is None else str(list(self.cotangent.shape)),
                str(self.order),
                str(self.batch),
                self.dtype,
            ]
        )


@dataclass(slots=True)
class GradientResult:
    value: np.ndarray
    gradient: dict[str, np.ndarray] | None = None
    jacobian: dict[str, np.ndarray] | None = None
    hessian: dict[str, dict[str, np.ndarray]] | None = None
    hvp: dict[str, np.ndarray] | None = None
    jvp: np.ndarray | None = None
    vjp: dict[str, np.ndarray] | None = None
    # `order` k: derivatives[i] is the (i+1)-th derivative tensor, shape var.shape * (i+1)
    higher: dict[str, Any] | None = None
    cache: str = "miss"  # "hit" | "miss": whether the compiled program was already cached
    compute_ms: float = 0.0


Job = GradientJob
Result = GradientResult
