"""Every builtin function against float64 central finite differences and, where numpy has it, its value.

Each case is one small expression that wraps the functions it covers in a weighted sum, so every
output element reaches the scalar being differentiated. The gradient is checked against central
differences of the engine's value, the Hessian against a 5-point stencil of the engine's gradient.
A builtin added to the table without a case here fails ``test_every_builtin_has_a_case``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from service.engine import execute
from service.errors import EvaluationError
from service.expr.functions import BUILTINS
from service.jobs import GradientJob, GradientResult
from tests.engine.finite_differences import Arrays, finite_difference
from tests.tolerances import (
    CLOSED_FORM,
    EXACT,
    FINITE_DIFFERENCE,
    STENCIL_REFERENCE,
    Tolerance,
    assert_close,
)

# Central differences in float64: h = 1e-6 balances truncation (~h**2) against rounding (~1e-16 / h).
FIRST_ORDER_STEP = 1e-6
# The 5-point stencil's truncation error is ~h**4, so a larger step keeps rounding small too.
SECOND_ORDER_STEP = 1e-3

_rng = np.random.default_rng(20240611)


def weights(*shape: int) -> np.ndarray:
    """Fixed random weights in [0.5, 1.5] with random signs, so every output element matters."""
    return _rng.uniform(0.5, 1.5, shape) * _rng.choice([-1.0, 1.0], shape)


def arr(values: Any) -> np.ndarray:
    return np.array(values, dtype=np.float64)


@dataclass
class Case:
    """One expression, the builtins it covers, and what its value and derivatives must be."""

    id: str
    covers: tuple[str, ...]
    expression: str
    variables: Arrays
    constants: Arrays = field(default_factory=dict)
    # numpy value of the expression from all inputs (variables and constants by name)
    reference: Callable[[Arrays], Any] | None = None
    # hand-computed gradient {name: array}, for functions whose gradient is not the derivative
    gradient: Callable[[Arrays], Arrays] | None = None
    # False: no Hessian check; a callable: hand-computed {a: {b: array}}; True: 5-point stencil
    hessian: bool | Callable[[Arrays], dict[str, Arrays]] = True
    # {"value" | "gradient" | "hessian": reason} for engine bugs reported and not fixed yet
    known_bugs: dict[str, str] = field(default_factory=dict)
    # how close the value must be to ``reference``: looser only where the reference has its own error
    value_tolerance: Tolerance = CLOSED_FORM


def run(case: Case, variables: Arrays) -> GradientResult:
    # One derivative set per case, so every call after the first reuses the same compiled program.
    derivatives = ("gradient", "hessian") if case.hessian is not False else ("gradient",)
    job = GradientJob(
        expression=case.expression,
        variables=variables,
        constants=case.constants,
        derivatives=derivatives,
        dtype="float64",
    )
    return execute(job)


# -- numpy references numpy does not have ---------------------------------------------------------

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
_erf = np.vectorize(math.erf)
_lgamma = np.vectorize(math.lgamma)


def _digamma(x: np.ndarray) -> np.ndarray:
    # psi = lgamma', by a 5-point stencil: truncation ~h**4 * lgamma^(5) / 30, up to ~4e-11 at these
    # points (the ones near the poles), hence its value is held to STENCIL_REFERENCE
    h = 1e-3
    return (-_lgamma(x + 2 * h) + 8 * _lgamma(x + h) - 8 * _lgamma(x - h) + _lgamma(x - 2 * h)) / (12 * h)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _logsumexp(x: np.ndarray, axis: Any = None, keepdims: bool = False) -> np.ndarray:
    return np.log(np.sum(np.exp(x), axis=axis, keepdims=keepdims))


def _entrywise_norm(x: np.ndarray, ord: Any = None, axis: Any = None, keepdims: bool = False) -> np.ndarray:
    if ord == 1:
        return np.sum(np.abs(x), axis=axis, keepdims=keepdims)
    if ord == math.inf:
        return np.max(np.abs(x), axis=axis, keepdims=keepdims)
    return np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims))


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


# -- cases: elementwise --------------------------------------------------------------------------

GENERAL = arr([-1.3, -0.4, 0.2, 0.9, 1.7])  # away from 0, integers and half-integers
POSITIVE = arr([0.3, 0.8, 1.5, 2.7, 4.1])
UNIT_OPEN = arr([-0.8, -0.3, 0.1, 0.5, 0.7])  # inside (-1, 1)
ABOVE_ONE = arr([1.2, 1.6, 2.3, 3.1, 4.5])
W5 = weights(5)

UNARY: dict[str, tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]] = {
    "abs": (GENERAL, np.abs),
    "sign": (GENERAL, np.sign),
    "sqrt": (POSITIVE, np.sqrt),
    "square": (GENERAL, np.square),
    "exp": (GENERAL, np.exp),
    "expm1": (GENERAL, np.expm1),
    "log": (POSITIVE, np.log),
    "log1p": (arr([-0.7, -0.2, 0.3, 1.1, 2.5]), np.log1p),
    "log2": (POSITIVE, np.log2),
    "log10": (POSITIVE, np.log10),
    "sin": (GENERAL, np.sin),
    "cos": (GENERAL, np.cos),
    "tan": (arr([-1.2, -0.4, 0.2, 0.9, 1.3]), np.tan),
    "arcsin": (UNIT_OPEN, np.arcsin),
    "arccos": (UNIT_OPEN, np.arccos),
    "arctan": (GENERAL, np.arctan),
    "sinh": (GENERAL, np.sinh),
    "cosh": (GENERAL, np.cosh),
    "tanh": (GENERAL, np.tanh),
    "arcsinh": (GENERAL, np.arcsinh),
    "arccosh": (ABOVE_ONE, np.arccosh),
    "arctanh": (UNIT_OPEN, np.arctanh),
    "sigmoid": (GENERAL, _sigmoid),
    "relu": (GENERAL, lambda x: np.maximum(x, 0.0)),
    "softplus": (GENERAL, lambda x: np.log1p(np.exp(x))),
    "elu": (GENERAL, lambda x: np.where(x > 0, x, np.expm1(x))),
    "selu": (GENERAL, lambda x: _SELU_SCALE * np.where(x > 0, x, _SELU_ALPHA * np.expm1(x))),
    "swish": (GENERAL, lambda x: x * _sigmoid(x)),
    "erf": (GENERAL, _erf),
    "lgamma": (arr([-2.5, -0.5, 0.3, 1.5, 4.1]), _lgamma),
    "digamma": (arr([-2.5, -0.5, 0.3, 1.5, 4.1]), _digamma),
    "floor": (GENERAL, np.floor),
    "ceil": (GENERAL, np.ceil),
    "round": (GENERAL, np.round),
}


def _unary_case(
    name: str,
    x: np.ndarray,
    ref: Callable[[np.ndarray], np.ndarray],
    known_bugs: dict[str, str] | None = None,
) -> Case:
    # digamma's reference is a 5-point stencil of lgamma: its own error is above CLOSED_FORM
    value_tolerance = STENCIL_REFERENCE if ref is _digamma else CLOSED_FORM
    return Case(
        id=name,
        covers=(name,),
        expression=f"sum({name}(x) * w)",
        variables={"x": x},
        constants={"w": W5},
        reference=lambda p: np.sum(ref(p["x"]) * p["w"]),
        known_bugs=known_bugs or {},
        value_tolerance=value_tolerance,
    )


CASES: list[Case] = [_unary_case(name, x, ref) for name, (x, ref) in UNARY.items()]
CASES.append(
    _unary_case(
        "gelu",
        GENERAL,
        lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    )
)

V3 = arr([0.7, -1.1, 0.4])
U3 = arr([0.2, 0.9, -1.5])
A23 = arr([[0.6, -1.2, 0.9], [1.4, 0.7, -0.5]])
B32 = arr([[0.3, -0.8], [1.1, 0.5], [-0.6, 1.3]])
S33 = arr([[0.9, -0.4, 0.3], [0.2, 1.1, -0.7], [-0.5, 0.6, 1.2]])
T223 = arr([[[0.5, -0.3, 0.8], [1.2, 0.1, -0.9]], [[-0.4, 0.7, 0.2], [0.6, -1.1, 0.3]]])
# Well-conditioned (diagonally dominant) matrices for det, inv and solve; the second has det < 0.
M33 = arr([[2.1, 0.3, -0.4], [0.2, 1.8, 0.5], [-0.3, 0.4, 2.4]])
MB233 = np.stack([M33.T, arr([[-1.9, 0.2, 0.3], [0.4, 2.2, -0.1], [0.1, -0.5, 1.7]])])

CASES += [
    Case(
        id="zeros_like-ones_like",
        covers=("zeros_like", "ones_like"),
        expression="sum((zeros_like(x) + 2 * ones_like(x)) * x * w)",
        variables={"x": GENERAL},
        constants={"w": W5},
        reference=lambda p: np.sum((np.zeros_like(p["x"]) + 2 * np.ones_like(p["x"])) * p["x"] * p["w"]),
    ),
    Case(
        id="arctan2",
        covers=("arctan2",),
        # one point in each quadrant, none on the branch cut (negative x axis)
        expression="sum(arctan2(y, x) * w)",
        variables={"y": arr([0.5, 0.7, -0.6, -0.9, 1.2]), "x": arr([1.0, -0.8, -1.1, 0.3, 0.1])},
        constants={"w": W5},
        reference=lambda p: np.sum(np.arctan2(p["y"], p["x"]) * p["w"]),
    ),
    Case(
        id="maximum-minimum",
        covers=("maximum", "minimum"),
        expression="sum(maximum(a, b) * w) + sum(minimum(a, b) * w2) + sum(maximum(a, 0.5) * a)",
        variables={"a": V3, "b": U3},
        constants={"w": weights(3), "w2": weights(3)},
        reference=lambda p: (
            np.sum(np.maximum(p["a"], p["b"]) * p["w"])
            + np.sum(np.minimum(p["a"], p["b"]) * p["w2"])
            + np.sum(np.maximum(p["a"], 0.5) * p["a"])
        ),
    ),
    Case(
        id="clip",
        covers=("clip",),
        # element 0 inside [lo, hi], element 1 below lo, element 2 above hi: each bound gets a gradient
        expression="sum(clip(x, lo, hi) * w) + sum(clip(A, -0.8, 0.75) * W)",
        variables={
            "x": arr([0.1, -1.2, 1.5]),
            "lo": arr([-0.4, -0.6, -0.2]),
            "hi": arr([0.3, 0.9, 1.1]),
            "A": A23,
        },
        constants={"w": weights(3), "W": weights(2, 3)},
        reference=lambda p: (
            np.sum(np.clip(p["x"], p["lo"], p["hi"]) * p["w"]) + np.sum(np.clip(p["A"], -0.8, 0.75) * p["W"])
        ),
    ),
    Case(
        id="where",
        covers=("where",),
        expression="sum(where(x > 0.5, sin(x), x * x) * w) + sum(where(A < 0, A, 2 * A) * W)",
        variables={"x": arr([0.1, 0.9, -0.4, 1.3]), "A": A23},
        constants={"w": weights(4), "W": weights(2, 3)},
        reference=lambda p: (
            np.sum(np.where(p["x"] > 0.5, np.sin(p["x"]), p["x"] ** 2) * p["w"])
            + np.sum(np.where(p["A"] < 0, p["A"], 2 * p["A"]) * p["W"])
        ),
    ),
    Case(
        id="cast",
        covers=("cast",),
        # float64 -> float64 is the identity; int32 truncates (zero derivative); bool -> 0/1 mask
        expression='sum(cast(x, "float64") * w) + sum(cast(3 * x, "int32") * w * x) '
        '+ sum(where(cast(floor(2 * x), "bool"), x, -x) * w)',
        variables={"x": GENERAL},
        constants={"w": W5},
        reference=lambda p: (
            np.sum(p["x"] * p["w"])
            + np.sum(np.trunc(3 * p["x"]) * p["w"] * p["x"])
            + np.sum(np.where(np.floor(2 * p["x"]) != 0, p["x"], -p["x"]) * p["w"])
        ),
    ),
    Case(
        id="cast-float32",
        covers=("cast",),
        # the gradient passes through a float32 cast (rounded to float32), so it is checked by hand
        expression='sum(cast(x, "float32") * w)',
        variables={"x": GENERAL},
        constants={"w": W5},
        gradient=lambda p: {"x": p["w"].astype(np.float32).astype(np.float64)},
        hessian=lambda p: {"x": {"x": np.zeros((5, 5))}},
    ),
]

# -- cases: reductions ---------------------------------------------------------------------------

X23 = arr([[0.8, 1.3, 0.55], [1.1, 0.65, 1.45]])  # positive (prod) with distinct entries (max, min)
REDUCE_W = {"a": weights(3), "b": weights(2, 1), "W": weights(2, 3)}


def _reduction_case(name: str, ref: Callable[..., np.ndarray]) -> Case:
    # axis=0, axis=1 with keepdims, a tuple of axes, and the default (all axes)
    expression = (
        f"sum({name}(X, axis=0) * a) + sum({name}(X, axis=1, keepdims=True) * b) "
        f"+ 0.7 * {name}(X, axis=(0, 1)) + {name}(X * W + 2)"
    )

    def reference(p: Arrays) -> Any:
        x = p["X"]
        return (
            np.sum(ref(x, axis=0) * p["a"])
            + np.sum(ref(x, axis=1, keepdims=True) * p["b"])
            + 0.7 * ref(x, axis=(0, 1))
            + ref(x * p["W"] + 2)
        )

    return Case(
        id=name,
        covers=(name,),
        expression=expression,
        variables={"X": X23},
        constants=REDUCE_W,
        reference=reference,
    )


CASES += [
    _reduction_case("sum", np.sum),
    _reduction_case("mean", np.mean),
    _reduction_case("prod", np.prod),
    _reduction_case("max", np.max),
    _reduction_case("min", np.min),
    _reduction_case("logsumexp", _logsumexp),
    _reduction_case("var", np.var),
    _reduction_case("std", np.std),
    Case(
        id="norm",
        covers=("norm",),
        expression='norm(X) + 0.5 * norm(X, "fro") + sum(norm(X, 2, axis=1, keepdims=True) * b) '
        "+ sum(norm(X, 1, axis=0) * a) + 0.3 * norm(X, inf) + sum(norm(X, ord=inf, axis=1) * c)",
        variables={"X": A23},  # no zeros and no ties in |X|
        constants={"a": weights(3), "b": weights(2, 1), "c": weights(2)},
        reference=lambda p: (
            _entrywise_norm(p["X"])
            + 0.5 * _entrywise_norm(p["X"])
            + np.sum(_entrywise_norm(p["X"], 2, axis=1, keepdims=True) * p["b"])
            + np.sum(_entrywise_norm(p["X"], 1, axis=0) * p["a"])
            + 0.3 * _entrywise_norm(p["X"], math.inf)
            + np.sum(_entrywise_norm(p["X"], math.inf, axis=1) * p["c"])
        ),
    ),
    Case(
        id="cumsum",
        covers=("cumsum",),
        expression="sum(cumsum(X) * w) + sum(cumsum(X, axis=0) * W) + sum(cumsum(X, axis=1) * W2)",
        variables={"X": A23},
        constants={"w": weights(6), "W": weights(2, 3), "W2": weights(2, 3)},
        reference=lambda p: (
            np.sum(np.cumsum(p["X"]) * p["w"])
            + np.sum(np.cumsum(p["X"], axis=0) * p["W"])
            + np.sum(np.cumsum(p["X"], axis=1) * p["W2"])
        ),
    ),
    Case(
        id="cumprod",
        covers=("cumprod",),
        expression="sum(cumprod(X) * w) + sum(cumprod(X, axis=0) * W) + sum(cumprod(X, axis=1) * W2)",
        variables={"X": A23},
        constants={"w": weights(6), "W": weights(2, 3), "W2": weights(2, 3)},
        reference=lambda p: (
            np.sum(np.cumprod(p["X"]) * p["w"])
            + np.sum(np.cumprod(p["X"], axis=0) * p["W"])
            + np.sum(np.cumprod(p["X"], axis=1) * p["W2"])
        ),
    ),
]

# -- cases: linear algebra -----------------------------------------------------------------------

CASES += [
    Case(
        id="matmul-2d",
        covers=("matmul",),
        # 2-D @ 2-D, the @ operator, and a batch of matrices times one matrix
        expression="sum(matmul(A, B) * W) + sum((A @ B) * W2) + sum(matmul(T, B) * W3)",
        variables={"A": A23, "B": B32, "T": T223},
        constants={"W": weights(2, 2), "W2": weights(2, 2), "W3": weights(2, 2, 2)},
        reference=lambda p: (
            np.sum(np.matmul(p["A"], p["B"]) * p["W"])
            + np.sum((p["A"] @ p["B"]) * p["W2"])
            + np.sum(np.matmul(p["T"], p["B"]) * p["W3"])
        ),
    ),
    Case(
        id="matmul-1d",
        covers=("matmul",),
        # vector @ matrix, matrix @ vector, vector @ vector
        expression="sum(matmul(u, A) * w3) + sum(matmul(A, v) * w2) + matmul(v, v)",
        variables={"A": A23, "v": V3, "u": arr([0.4, -0.9])},
        constants={"w3": weights(3), "w2": weights(2)},
        reference=lambda p: (
            np.sum(np.matmul(p["u"], p["A"]) * p["w3"])
            + np.sum(np.matmul(p["A"], p["v"]) * p["w2"])
            + np.matmul(p["v"], p["v"])
        ),
    ),
    Case(
        id="dot",
        covers=("dot",),
        expression="sum(dot(A, B) * W) + dot(v, v) + sum(dot(A, v) * w2) + sum(dot(u, A) * w3) "
        "+ sum(dot(T, B) * W3) + sum(dot(2.0, v) * w3)",
        variables={"A": A23, "B": B32, "T": T223, "v": V3, "u": arr([0.4, -0.9])},
        constants={"W": weights(2, 2), "W3": weights(2, 2, 2), "w2": weights(2), "w3": weights(3)},
        reference=lambda p: (
            np.sum(np.dot(p["A"], p["B"]) * p["W"])
            + np.dot(p["v"], p["v"])
            + np.sum(np.dot(p["A"], p["v"]) * p["w2"])
            + np.sum(np.dot(p["u"], p["A"]) * p["w3"])
            + np.sum(np.dot(p["T"], p["B"]) * p["W3"])
            + np.sum(np.dot(2.0, p["v"]) * p["w3"])
        ),
    ),
    Case(
        id="einsum",
        covers=("einsum",),
        expression='sum(einsum("ij,jk->ik", A, B) * W) + einsum("i,i->", v, v) '
        '+ sum(einsum("bij,jk->bik", T, B) * W3) + einsum("ij->", A) + sum(einsum("ij->j", S) * w3)',
        variables={"A": A23, "B": B32, "T": T223, "v": V3, "S": S33},
        constants={"W": weights(2, 2), "W3": weights(2, 2, 2), "w3": weights(3)},
        reference=lambda p: (
            np.sum(np.einsum("ij,jk->ik", p["A"], p["B"]) * p["W"])
            + np.einsum("i,i->", p["v"], p["v"])
            + np.sum(np.einsum("bij,jk->bik", p["T"], p["B"]) * p["W3"])
            + np.einsum("ij->", p["A"])
            + np.sum(np.einsum("ij->j", p["S"]) * p["w3"])
        ),
    ),
    Case(
        id="transpose",
        covers=("transpose",),
        expression="sum(transpose(A) * W) + sum(transpose(T, (1, 2, 0)) * W3) + sum(transpose(A) @ A * S)",
        variables={"A": A23, "T": T223},
        constants={"W": weights(3, 2), "W3": weights(2, 3, 2), "S": weights(3, 3)},
        reference=lambda p: (
            np.sum(p["A"].T * p["W"])
            + np.sum(np.transpose(p["T"], (1, 2, 0)) * p["W3"])
            + np.sum(p["A"].T @ p["A"] * p["S"])
        ),
    ),
    Case(
        id="trace",
        covers=("trace",),
        # numpy's trace of a 3-D tensor sums the diagonal of its first two axes
        expression="trace(S * S) + sum(trace(T) * w)",
        variables={"S": S33, "T": arr(np.arange(12).reshape(2, 2, 3)) / 7 - 0.5},
        constants={"w": weights(3)},
        reference=lambda p: np.trace(p["S"] * p["S"]) + np.sum(np.trace(p["T"]) * p["w"]),
    ),
    Case(
        id="det",
        covers=("det",),
        expression="det(M) + sum(det(MB) * w)",
        variables={"M": M33, "MB": MB233},
        constants={"w": weights(2)},
        reference=lambda p: np.linalg.det(p["M"]) + np.sum(np.linalg.det(p["MB"]) * p["w"]),
    ),
    Case(
        id="slogdet",
        covers=("slogdet",),
        expression="slogdet(M) + sum(slogdet(MB) * w)",  # MB[1] has a negative determinant
        variables={"M": M33, "MB": MB233},
        constants={"w": weights(2)},
        reference=lambda p: np.linalg.slogdet(p["M"])[1] + np.sum(np.linalg.slogdet(p["MB"])[1] * p["w"]),
    ),
    Case(
        id="inv",
        covers=("inv",),
        expression="sum(inv(M) * W) + sum(inv(MB) * W3)",
        variables={"M": M33, "MB": MB233},
        constants={"W": weights(3, 3), "W3": weights(2, 3, 3)},
        reference=lambda p: np.sum(np.linalg.inv(p["M"]) * p["W"]) + np.sum(np.linalg.inv(p["MB"]) * p["W3"]),
    ),
    Case(
        id="cholesky",
        covers=("cholesky",),
        # built symmetric positive definite from A, so a perturbation of A keeps it so
        expression="sum(cholesky(A @ transpose(A) + 2 * eye(3)) * W)",
        variables={"A": S33},
        constants={"W": weights(3, 3)},
        reference=lambda p: np.sum(np.linalg.cholesky(p["A"] @ p["A"].T + 2 * np.eye(3)) * p["W"]),
    ),
    Case(
        id="solve",
        covers=("solve",),
        expression="sum(solve(M, b) * w) + sum(solve(M, B) * W)",
        variables={"M": M33, "b": V3, "B": B32},
        constants={"w": weights(3), "W": weights(3, 2)},
        reference=lambda p: (
            np.sum(np.linalg.solve(p["M"], p["b"]) * p["w"])
            + np.sum(np.linalg.solve(p["M"], p["B"]) * p["W"])
        ),
    ),
    Case(
        id="diag",
        covers=("diag",),
        expression="sum(diag(v) * W) + sum(diag(v, k=1) * W4) + sum(diag(S) * w3) + sum(diag(S, k=-1) * w2) "
        "+ sum(diag(v * v, 2) * W5)",
        variables={"v": V3, "S": S33},
        constants={
            "W": weights(3, 3),
            "W4": weights(4, 4),
            "W5": weights(5, 5),
            "w3": weights(3),
            "w2": weights(2),
        },
        reference=lambda p: (
            np.sum(np.diag(p["v"]) * p["W"])
            + np.sum(np.diag(p["v"], k=1) * p["W4"])
            + np.sum(np.diag(p["S"]) * p["w3"])
            + np.sum(np.diag(p["S"], k=-1) * p["w2"])
            + np.sum(np.diag(p["v"] ** 2, 2) * p["W5"])
        ),
    ),
    Case(
        id="eye",
        covers=("eye",),
        expression="sum((eye(3) + 0.5) * S * S) + sum(eye(2, 3) * A) + sum(matmul(eye(3, 2), v) * w)",
        variables={"S": S33, "A": A23, "v": arr([0.4, -0.9])},
        constants={"w": weights(3)},
        reference=lambda p: (
            np.sum((np.eye(3) + 0.5) * p["S"] ** 2)
            + np.sum(np.eye(2, 3) * p["A"])
            + np.sum(np.eye(3, 2) @ p["v"] * p["w"])
        ),
    ),
]

# -- cases: shapes -------------------------------------------------------------------------------

CASES += [
    Case(
        id="reshape",
        covers=("reshape",),
        expression="sum(reshape(A, (3, 2)) * W) + sum(reshape(A * A, (-1,)) * w) "
        "+ sum(reshape(v, (3, 1)) * B)",
        variables={"A": A23, "v": V3},
        constants={"W": weights(3, 2), "w": weights(6), "B": weights(3, 1)},
        reference=lambda p: (
            np.sum(p["A"].reshape(3, 2) * p["W"])
            + np.sum((p["A"] ** 2).reshape(-1) * p["w"])
            + np.sum(p["v"].reshape(3, 1) * p["B"])
        ),
    ),
    Case(
        id="concatenate",
        covers=("concatenate",),
        expression="sum(concatenate([v, sin(v), u]) * w) + sum(concatenate([A, A * A], axis=1) * W)",
        variables={"v": V3, "u": arr([0.4, -0.9]), "A": A23},
        constants={"w": weights(8), "W": weights(2, 6)},
        reference=lambda p: (
            np.sum(np.concatenate([p["v"], np.sin(p["v"]), p["u"]]) * p["w"])
            + np.sum(np.concatenate([p["A"], p["A"] ** 2], axis=1) * p["W"])
        ),
    ),
    Case(
        id="stack",
        covers=("stack",),
        expression="sum(stack([v, v * v]) * W) + sum(stack([v, cos(v)], axis=1) * W2) "
        "+ sum(stack([A, A], -1) * W3)",
        variables={"v": V3, "A": A23},
        constants={"W": weights(2, 3), "W2": weights(3, 2), "W3": weights(2, 3, 2)},
        reference=lambda p: (
            np.sum(np.stack([p["v"], p["v"] ** 2]) * p["W"])
            + np.sum(np.stack([p["v"], np.cos(p["v"])], axis=1) * p["W2"])
            + np.sum(np.stack([p["A"], p["A"]], -1) * p["W3"])
        ),
    ),
    Case(
        id="expand_dims",
        covers=("expand_dims",),
        expression="sum(expand_dims(v, 0) * W) + sum(expand_dims(A * A, -1) * W3)",
        variables={"v": V3, "A": A23},
        constants={"W": weights(1, 3), "W3": weights(2, 3, 1)},
        reference=lambda p: (
            np.sum(np.expand_dims(p["v"], 0) * p["W"]) + np.sum(np.expand_dims(p["A"] ** 2, -1) * p["W3"])
        ),
    ),
    Case(
        id="squeeze",
        covers=("squeeze",),
        expression="sum(squeeze(X) * w) + sum(squeeze(X * X, axis=0) * W) "
        "+ sum(squeeze(X, axis=(0, 2)) * w2)",
        variables={"X": V3.reshape(1, 3, 1)},
        constants={"w": weights(3), "W": weights(3, 1), "w2": weights(3)},
        reference=lambda p: (
            np.sum(np.squeeze(p["X"]) * p["w"])
            + np.sum(np.squeeze(p["X"] ** 2, axis=0) * p["W"])
            + np.sum(np.squeeze(p["X"], axis=(0, 2)) * p["w2"])
        ),
    ),
    Case(
        id="tile",
        covers=("tile",),
        expression="sum(tile(v, 2) * w) + sum(tile(v * v, (2, 1)) * W) + sum(tile(A, (1, 2)) * W2)",
        variables={"v": V3, "A": A23},
        constants={"w": weights(6), "W": weights(2, 3), "W2": weights(2, 6)},
        reference=lambda p: (
            np.sum(np.tile(p["v"], 2) * p["w"])
            + np.sum(np.tile(p["v"] ** 2, (2, 1)) * p["W"])
            + np.sum(np.tile(p["A"], (1, 2)) * p["W2"])
        ),
    ),
    Case(
        id="broadcast_to",
        covers=("broadcast_to",),
        expression="sum(broadcast_to(v, (2, 3)) * W) + sum(broadcast_to(v[:, None] * v, (2, 3, 3)) * W3)",
        variables={"v": V3},
        constants={"W": weights(2, 3), "W3": weights(2, 3, 3)},
        reference=lambda p: (
            np.sum(np.broadcast_to(p["v"], (2, 3)) * p["W"])
            + np.sum(np.broadcast_to(p["v"][:, None] * p["v"], (2, 3, 3)) * p["W3"])
        ),
    ),
    Case(
        id="take",
        covers=("take",),
        # a repeated index must accumulate its gradient
        expression="sum(take(A, i) * w) + sum(take(A * A, j, axis=1) * W)",
        variables={"A": A23},
        constants={"i": arr([0, 5, 5, 2]), "j": arr([2, 0]), "w": weights(4), "W": weights(2, 2)},
        reference=lambda p: (
            np.sum(np.take(p["A"], p["i"].astype(int)) * p["w"])
            + np.sum(np.take(p["A"] ** 2, p["j"].astype(int), axis=1) * p["W"])
        ),
    ),
    Case(
        id="gather",
        covers=("gather",),
        expression="sum(gather(A, i, axis=1) * W) + sum(gather(v * v, j) * w)",
        variables={"A": A23, "v": V3},
        constants={"i": arr([2, 2, 1]), "j": arr([1, 0, 1, 2]), "W": weights(2, 3), "w": weights(4)},
        reference=lambda p: (
            np.sum(np.take(p["A"], p["i"].astype(int), axis=1) * p["W"])
            + np.sum(np.take(p["v"] ** 2, p["j"].astype(int), axis=0) * p["w"])
        ),
    ),
    Case(
        id="zeros-ones",
        covers=("zeros", "ones"),
        expression="sum((zeros((2, 3)) + 2 * ones((2, 3)) + A) * A * W) + sum(ones(3) * v)",
        variables={"A": A23, "v": V3},
        constants={"W": weights(2, 3)},
        reference=lambda p: (
            np.sum((np.zeros((2, 3)) + 2 * np.ones((2, 3)) + p["A"]) * p["A"] * p["W"])
            + np.sum(np.ones(3) * p["v"])
        ),
    ),
    Case(
        id="arange",
        covers=("arange",),
        expression="sum(arange(3) * v) + v[0] * sum(arange(1, 2, 0.25) * w) + sum(arange(3, 0, -1) * v * v)",
        variables={"v": V3},
        constants={"w": weights(4)},
        reference=lambda p: (
            np.sum(np.arange(3) * p["v"])
            + p["v"][0] * np.sum(np.arange(1, 2, 0.25) * p["w"])
            + np.sum(np.arange(3, 0, -1) * p["v"] ** 2)
        ),
    ),
    Case(
        id="linspace",
        covers=("linspace",),
        expression="sum(linspace(0, 1, 3) * v) + v[1] * sum(linspace(-1, 2) * w) "
        "+ sum(linspace(0, 1, 7)[:3] * v * v)",
        variables={"v": V3},
        constants={"w": weights(50)},
        reference=lambda p: (
            np.sum(np.linspace(0, 1, 3) * p["v"])
            + p["v"][1] * np.sum(np.linspace(-1, 2) * p["w"])
            + np.sum(np.linspace(0, 1, 7)[:3] * p["v"] ** 2)
        ),
    ),
    Case(
        id="triu-tril",
        covers=("triu", "tril"),
        expression="sum(triu(S) * W) + sum(triu(S * S, k=1) * W2) + sum(tril(S) * W3) "
        "+ sum(tril(A, -1) * W4)",
        variables={"S": S33, "A": A23},
        constants={"W": weights(3, 3), "W2": weights(3, 3), "W3": weights(3, 3), "W4": weights(2, 3)},
        reference=lambda p: (
            np.sum(np.triu(p["S"]) * p["W"])
            + np.sum(np.triu(p["S"] ** 2, k=1) * p["W2"])
            + np.sum(np.tril(p["S"]) * p["W3"])
            + np.sum(np.tril(p["A"], -1) * p["W4"])
        ),
    ),
    Case(
        id="one_hot",
        covers=("one_hot",),
        expression="sum(matmul(one_hot(i, 4), q * q) * w)",
        variables={"q": arr([0.3, -0.7, 1.1, 0.5])},
        constants={"i": arr([3, 0, 2]), "w": weights(3)},
        reference=lambda p: np.sum(np.eye(4)[p["i"].astype(int)] @ p["q"] ** 2 * p["w"]),
    ),
]

# -- cases: softmax and gradient control ---------------------------------------------------------


def _stop_gradient_hessian(p: Arrays) -> dict[str, Arrays]:
    # d/dx (stop(x) * w) is zero: nothing flows back through stop_gradient at any order
    return {"x": {"x": np.zeros((5, 5))}}


_CLIP_W = arr([2.0, -0.3, -1.5, 0.4, 0.9])  # two of the upstream gradients lie outside [-0.5, 0.5]
_CLIP_X = arr([0.2, -0.3, 0.8, -1.4])  # 2 * x lies outside [-1, 1] for the last two

CASES += [
    Case(
        id="softmax",
        covers=("softmax",),
        expression="sum(softmax(A) * W) + sum(softmax(A * A, axis=0) * W2) + sum(softmax(v) * w)",
        variables={"A": A23, "v": V3},
        constants={"W": weights(2, 3), "W2": weights(2, 3), "w": weights(3)},
        reference=lambda p: (
            np.sum(_softmax(p["A"]) * p["W"])
            + np.sum(_softmax(p["A"] ** 2, axis=0) * p["W2"])
            + np.sum(_softmax(p["v"]) * p["w"])
        ),
    ),
    Case(
        id="log_softmax",
        covers=("log_softmax",),
        expression="sum(log_softmax(A) * W) + sum(log_softmax(A * A, axis=0) * W2) + sum(log_softmax(v) * w)",
        variables={"A": A23, "v": V3},
        constants={"W": weights(2, 3), "W2": weights(2, 3), "w": weights(3)},
        reference=lambda p: (
            np.sum(np.log(_softmax(p["A"])) * p["W"])
            + np.sum(np.log(_softmax(p["A"] ** 2, axis=0)) * p["W2"])
            + np.sum(np.log(_softmax(p["v"])) * p["w"])
        ),
    ),
    Case(
        id="stop_gradient",
        covers=("stop_gradient",),
        expression="sum(stop_gradient(x) * x * w)",
        variables={"x": GENERAL},
        constants={"w": W5},
        reference=lambda p: np.sum(p["x"] ** 2 * p["w"]),
        gradient=lambda p: {"x": p["x"] * p["w"]},
        hessian=_stop_gradient_hessian,
    ),
    Case(
        id="clip_gradient-constant-upstream",
        covers=("clip_gradient",),
        expression="sum(clip_gradient(sin(x), -0.5, 0.5) * w)",
        variables={"x": GENERAL},
        constants={"w": _CLIP_W},
        reference=lambda p: np.sum(np.sin(p["x"]) * p["w"]),
        gradient=lambda p: {"x": np.cos(p["x"]) * np.clip(p["w"], -0.5, 0.5)},
        hessian=lambda p: {"x": {"x": np.diag(-np.sin(p["x"]) * np.clip(p["w"], -0.5, 0.5))}},
    ),
    Case(
        id="clip_gradient-varying-upstream",
        covers=("clip_gradient",),
        # upstream gradient 2x, clipped to [-1, 1]. clip_gradient clips every adjoint that flows back
        # through it, the second-order one too: inside the bounds the second pass brings 2, clipped to 1.
        expression="sum(clip_gradient(x, -1, 1) ** 2)",
        variables={"x": _CLIP_X},
        reference=lambda p: np.sum(p["x"] ** 2),
        gradient=lambda p: {"x": np.clip(2 * p["x"], -1.0, 1.0)},
        hessian=lambda p: {"x": {"x": np.diag(np.where(np.abs(2 * p["x"]) < 1, 1.0, 0.0))}},
    ),
]


# -- cases: what GradBench's evals need (gmm's Wishart prior, ba's rotations, gathers and sums) ------


def _multigammaln(a: np.ndarray, p: int) -> np.ndarray:
    # the definition: log Gamma_p(a) = p(p-1)/4 log(pi) + sum_{j=1..p} lgamma(a + (1 - j) / 2)
    return p * (p - 1) / 4 * math.log(math.pi) + sum(_lgamma(a + (1 - j) / 2) for j in range(1, p + 1))


def _scatter_add(x: np.ndarray, indices: np.ndarray, updates: np.ndarray) -> np.ndarray:
    out = x.copy()
    np.add.at(out, indices.astype(int), updates)
    return out


def _segment_sum(data: np.ndarray, ids: np.ndarray, count: int) -> np.ndarray:
    out = np.zeros((count, *data.shape[1:]))
    np.add.at(out, ids.astype(int), data)
    return out


_GAMMA_A = arr([1.2, 2.5, 3.1, 4.7])  # above (p - 1) / 2 for p = 3, where Gamma_p is finite
_SCATTER_I = arr([0, 3, 0])  # a repeated row must accumulate, and row 1, 2 stay as they were
_SEGMENT_IDS = arr([2, 0, 2, 1, 2])  # segment 3 is empty: a zero row, and no gradient anywhere

CASES += [
    Case(
        id="multigammaln",
        covers=("multigammaln",),
        # p = 1 is lgamma itself; p = 3 adds the shifted terms and the constant
        expression="sum(multigammaln(a, 1) * w) + sum(multigammaln(a * a, 3) * w2)",
        variables={"a": _GAMMA_A},
        constants={"w": weights(4), "w2": weights(4)},
        reference=lambda p: (
            np.sum(_lgamma(p["a"]) * p["w"]) + np.sum(_multigammaln(p["a"] ** 2, 3) * p["w2"])
        ),
    ),
    Case(
        id="cross",
        covers=("cross",),
        # a row of a against one b (broadcast), and a with itself squared
        expression="sum(cross(A, v) * W) + sum(cross(v * v, A[0]) * w)",
        variables={"A": arr([[0.6, -1.2, 0.9], [1.4, 0.7, -0.5]]), "v": V3},
        constants={"W": weights(2, 3), "w": weights(3)},
        reference=lambda p: (
            np.sum(np.cross(p["A"], p["v"]) * p["W"]) + np.sum(np.cross(p["v"] ** 2, p["A"][0]) * p["w"])
        ),
    ),
    Case(
        id="scatter_add",
        covers=("scatter_add",),
        expression="sum(scatter_add(X, i, U * U) * W) + sum(scatter_add(v, j, 2 * v[:2] * v[1:]) * w)",
        variables={
            "X": arr([[0.3, -0.8], [1.1, 0.5], [-0.6, 1.3], [0.2, 0.4]]),
            "U": arr([[0.5, -0.3], [0.8, 1.2], [-0.4, 0.1]]),
            "v": V3,
        },  # fmt: skip
        constants={"i": _SCATTER_I, "j": arr([2, 2]), "W": weights(4, 2), "w": weights(3)},
        reference=lambda p: (
            np.sum(_scatter_add(p["X"], p["i"], p["U"] ** 2) * p["W"])
            + np.sum(_scatter_add(p["v"], p["j"], 2 * p["v"][:2] * p["v"][1:]) * p["w"])
        ),
    ),
    Case(
        id="segment_sum",
        covers=("segment_sum",),
        expression="sum(segment_sum(D * D, s, 4) * W) + sum(segment_sum(v, s[:3], 3) * w)",
        variables={"D": arr([[0.3, -0.8], [1.1, 0.5], [-0.6, 1.3], [0.2, 0.4], [0.9, -0.7]]), "v": V3},
        constants={"s": _SEGMENT_IDS, "W": weights(4, 2), "w": weights(3)},
        reference=lambda p: (
            np.sum(_segment_sum(p["D"] ** 2, p["s"], 4) * p["W"])
            + np.sum(_segment_sum(p["v"], p["s"][:3], 3) * p["w"])
        ),
    ),
]


def test_segment_sum_refuses_ids_out_of_range() -> None:
    # a silently dropped row (TF's rule for negative ids) would be a wrong answer, not an error
    for bad in ([0, -1], [0, 2]):
        job = GradientJob(
            expression="sum(segment_sum(x, s, 2))",
            variables={"x": arr([1.0, 2.0])},
            constants={"s": arr(bad)},
            dtype="float64",
        )
        with pytest.raises(EvaluationError, match="out of range"):
            execute(job)


def _params(kind: str) -> list[Any]:
    params = []
    for case in CASES:
        if kind == "value" and case.reference is None or kind == "hessian" and case.hessian is False:
            continue
        marks = (
            [pytest.mark.xfail(strict=True, reason=case.known_bugs[kind])] if kind in case.known_bugs else []
        )
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


# -- tests ---------------------------------------------------------------------------------------


def test_every_builtin_has_a_case() -> None:
    covered = {name for case in CASES for name in case.covers}
    assert sorted(set(BUILTINS) - covered) == [], "builtins without a finite-difference case"
    assert sorted(covered - set(BUILTINS)) == [], "cases for functions that are not builtins"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_calls_what_it_covers(case: Case) -> None:
    for name in case.covers:
        assert re.search(rf"\b{name}\(", case.expression), f"{case.id} does not call {name}()"


@pytest.mark.parametrize("case", _params("value"))
def test_value_matches_numpy(case: Case) -> None:
    assert case.reference is not None
    result = run(case, case.variables)
    expected = case.reference(case.variables | case.constants)
    # scaled: a value near 0 (a weighted sum that cancels) is held to the relative bound in absolute terms
    tolerance = case.value_tolerance.scaled(expected)
    assert_close(result.value, expected, tolerance, f"value of {case.expression}")


@pytest.mark.parametrize("case", _params("gradient"))
def test_gradient_matches_finite_differences(case: Case) -> None:
    result = run(case, case.variables)
    assert result.gradient is not None
    if case.gradient is not None:
        expected = case.gradient(case.variables | case.constants)
    else:
        expected = {
            name: finite_difference(lambda v: run(case, v).value, case.variables, name, FIRST_ORDER_STEP, 3)
            for name in case.variables
        }
    for name in case.variables:
        tolerance = FINITE_DIFFERENCE.scaled(expected[name])
        assert_close(result.gradient[name], expected[name], tolerance, f"d/d{name} of {case.expression}")


@pytest.mark.parametrize("case", _params("hessian"))
def test_hessian_matches_finite_differences(case: Case) -> None:
    result = run(case, case.variables)
    assert result.hessian is not None
    if callable(case.hessian):
        expected = case.hessian(case.variables | case.constants)
    else:
        expected = {a: {} for a in case.variables}
        for b in case.variables:
            for a in case.variables:
                expected[a][b] = finite_difference(
                    lambda v, a=a: run(case, v).gradient[a], case.variables, b, SECOND_ORDER_STEP, 5
                )
    for a in case.variables:
        for b in case.variables:
            tolerance = FINITE_DIFFERENCE.scaled(expected[a][b])
            assert_close(result.hessian[a][b], expected[a][b], tolerance, f"d2/d{a}d{b} of {case.expression}")


# -- user functions with custom gradients: second order goes through the gradient expression ------

X4 = arr([-1.2, -0.3, 0.5, 1.4])
W4 = weights(4)


def custom(expression: str, functions: dict[str, Any], variables: Arrays, **extra: Any) -> GradientResult:
    job = GradientJob(
        expression=expression,
        variables=variables,
        constants={"w": W4},
        functions=functions,
        derivatives=("gradient", "hessian"),
        dtype="float64",
        **extra,
    )
    return execute(job)


def test_custom_gradient_cube_has_the_true_hessian() -> None:
    fns = {"cube": {"params": ["x"], "body": "x**3", "gradient": {"x": "dy * 3 * x**2"}}}
    r = custom("sum(cube(x) * w)", fns, {"x": X4})
    assert_close(r.value, np.sum(X4**3 * W4), CLOSED_FORM, "value")
    assert_close(r.gradient["x"], 3 * X4**2 * W4, CLOSED_FORM, "gradient")
    assert_close(r.hessian["x"]["x"], np.diag(6 * X4 * W4), CLOSED_FORM, "hessian")


def test_custom_gradient_third_order_through_the_gradient_expression() -> None:
    fns = {"cube": {"params": ["x"], "body": "x**3", "gradient": {"x": "dy * 3 * x**2"}}}
    job = GradientJob(
        expression="cube(x)",
        variables={"x": np.array(0.7)},
        functions=fns,
        order=3,
        wrt=("x",),
        dtype="float64",
    )
    r = execute(job)
    assert r.higher is not None
    assert_close(r.higher["derivatives"], [3 * 0.7**2, 6 * 0.7, 6.0], CLOSED_FORM, "derivatives 1..3")


def test_custom_gradient_that_is_not_the_derivative_is_the_one_used() -> None:
    # body sin(x), declared gradient 2x: the engine must use 2x (and its derivative 2), not cos(x)
    fns = {"fake": {"params": ["x"], "body": "sin(x)", "gradient": {"x": "dy * 2 * x"}}}
    r = custom("sum(fake(x) * w)", fns, {"x": X4})
    assert_close(r.value, np.sum(np.sin(X4) * W4), CLOSED_FORM, "value")
    assert_close(r.gradient["x"], 2 * X4 * W4, CLOSED_FORM, "gradient")
    assert_close(r.hessian["x"]["x"], np.diag(2 * W4), CLOSED_FORM, "hessian")


def test_custom_gradient_using_the_output_y() -> None:
    fns = {"myexp": {"params": ["x"], "body": "exp(x)", "gradient": {"x": "dy * y"}}}
    r = custom("sum(myexp(x) * w)", fns, {"x": X4})
    assert_close(r.gradient["x"], np.exp(X4) * W4, CLOSED_FORM, "gradient")
    assert_close(r.hessian["x"]["x"], np.diag(np.exp(X4) * W4), CLOSED_FORM, "hessian")


def test_custom_gradient_for_one_parameter_autodiff_for_the_other() -> None:
    # f(x, z) = x sin(z) with a declared gradient for x only: z's gradient is autodiff of the body
    fns = {"f": {"params": ["x", "z"], "body": "x * sin(z)", "gradient": {"x": "dy * sin(z)"}}}
    z = arr([0.4, -0.8, 1.1, 0.2])
    r = custom("sum(f(x, z) * w)", fns, {"x": X4, "z": z})
    assert_close(r.gradient["x"], np.sin(z) * W4, CLOSED_FORM, "d/dx")
    assert_close(r.gradient["z"], X4 * np.cos(z) * W4, CLOSED_FORM, "d/dz")
    h = r.hessian
    assert_close(h["x"]["x"], np.zeros((4, 4)), CLOSED_FORM, "d2/dx2")
    assert_close(h["x"]["z"], np.diag(np.cos(z) * W4), CLOSED_FORM, "d2/dx dz")
    assert_close(h["z"]["x"], np.diag(np.cos(z) * W4), CLOSED_FORM, "d2/dz dx")
    assert_close(h["z"]["z"], np.diag(-X4 * np.sin(z) * W4), CLOSED_FORM, "d2/dz2")


def test_custom_gradient_of_a_broadcast_parameter_is_summed() -> None:
    # a scalar parameter broadcast against a vector: its gradient expression has the vector's shape
    fns = {"scale": {"params": ["a", "v"], "body": "a * v", "gradient": {"a": "dy * v", "v": "dy * a"}}}
    a = np.array(1.7)
    r = custom("sum(scale(a, x) ** 2 * w)", fns, {"a": a, "x": X4})
    assert_close(r.gradient["a"], np.sum(2 * a * X4**2 * W4), CLOSED_FORM, "d/da")
    assert_close(r.gradient["x"], 2 * a**2 * X4 * W4, CLOSED_FORM, "d/dx")
    assert_close(r.hessian["a"]["a"], np.sum(2 * X4**2 * W4), CLOSED_FORM, "d2/da2")
    assert_close(r.hessian["a"]["x"], 4 * a * X4 * W4, CLOSED_FORM, "d2/da dx")
    assert_close(r.hessian["x"]["x"], np.diag(2 * a**2 * W4), CLOSED_FORM, "d2/dx2")


def test_seed_custom_relu() -> None:
    fns = {"custom_relu": {"params": ["x"], "body": "maximum(0.0, x)", "gradient": {"x": "dy * (x > 0)"}}}
    job = GradientJob(
        expression="custom_relu(x)", variables={"x": arr([-2.0, 0.0, 2.0])}, functions=fns, dtype="float64"
    )
    assert_close(execute(job).gradient["x"], [0.0, 0.0, 1.0], EXACT, "gradient")
