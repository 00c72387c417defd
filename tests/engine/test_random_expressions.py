"""Hypothesis-generated smooth expressions: every derivative the engine returns, checked for consistency.

Expressions are built over two length-3 variables x and y (and a constant c) from smooth operations
with safe denominators and bounded exponents, so central finite differences in float64 are a
reliable reference. Checked: gradient vs differences of the value; Hessian symmetric and vs a
5-point stencil of the gradient; hvp = H v; Jacobian vs differences; jvp = J v; vjp = u J;
batch=True per point equals unbatched per point.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import service.expr  # noqa: F401  (its parser raises the recursion limit on import: do it before hypothesis runs)
from service.engine import execute
from service.jobs import GradientJob, GradientResult
from tests.engine.finite_differences import Arrays, finite_difference
from tests.tolerances import DERIVED_CHAIN, FINITE_DIFFERENCE, Tolerance, assert_close

N = 3  # length of each variable
VARIABLES = ("x", "y")
CONSTANTS = {"c": np.array([0.8, -0.35, 1.2])}
# Central differences in float64: h = 1e-6 balances truncation (~h**2) against rounding (~1e-16 / h).
FIRST_ORDER_STEP = 1e-6
# The 5-point stencil's truncation error is ~h**4, so a larger step keeps rounding small too.
SECOND_ORDER_STEP = 1e-3
# Derivatives against differences: FINITE_DIFFERENCE. Identities between derivatives (hvp = H v, ...)
# involve only rounding, so they are held to the much tighter DERIVED_CHAIN.

# Each new expression costs a trace (~0.3-1 s); these counts keep the file well under a minute and a half.
# derandomize: CI sees the same examples on every run; exploring new ones is for local runs
# (HYPOTHESIS_PROFILE is not needed: change the seed here to explore).
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
BATCH_SETTINGS = settings(
    max_examples=10,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# -- the expression strategy ---------------------------------------------------------------------

VECTOR_UNARY = (
    "sin({0})",
    "cos({0})",
    "tanh({0})",
    "sigmoid({0})",
    "softplus({0})",
    "exp(tanh({0}))",  # bounded argument, so exp stays below e
    "({0})**2",
    "(-{0})",
    "(0.5 * {0})",
    "(1.5 * {0} - 0.3)",
    "({0} / 3)",
    "({0})[::-1]",
    "concatenate([({0})[1:], ({0})[:1]])",
)
VECTOR_BINARY = (
    "({0} + {1})",
    "({0} - {1})",
    "({0} * {1})",
    "({0} / (1 + ({1})**2))",  # denominator >= 1
)
SCALAR_FROM_VECTOR = ("sum({0})", "mean({0})", "({0})[0]", "({0})[-1]", "({0})[1]", "prod(tanh({0}) + 2)")
SCALAR_FROM_TWO_VECTORS = ("dot({0}, {1})", "({0} @ {1})")
SCALAR_BINARY = ("({0} + {1})", "({0} * {1})", "({0} / (1 + ({1})**2))")
SCALAR_UNARY = ("sin({0})", "tanh({0})", "({0})**2", "(2 * {0})")


@st.composite
def vector_expressions(draw: st.DrawFn, depth: int = 3) -> str:
    """An expression whose value has shape (3,)."""
    if depth == 0 or draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from(("x", "y", "c", "x", "y")))
    kind = draw(st.sampled_from(("unary", "binary", "scaled")))
    if kind == "unary":
        return draw(st.sampled_from(VECTOR_UNARY)).format(draw(vector_expressions(depth - 1)))
    if kind == "binary":
        a, b = draw(vector_expressions(depth - 1)), draw(vector_expressions(depth - 1))
        return draw(st.sampled_from(VECTOR_BINARY)).format(a, b)
    return f"({draw(scalar_expressions(depth - 1))} * {draw(vector_expressions(depth - 1))})"


@st.composite
def scalar_expressions(draw: st.DrawFn, depth: int = 3) -> str:
    """An expression whose value is a scalar."""
    kind = draw(
        st.sampled_from(("reduce", "reduce", "two", "binary", "unary")) if depth > 0 else st.just("reduce")
    )
    if kind == "reduce":
        return draw(st.sampled_from(SCALAR_FROM_VECTOR)).format(draw(vector_expressions(max(depth - 1, 0))))
    if kind == "two":
        a, b = draw(vector_expressions(depth - 1)), draw(vector_expressions(depth - 1))
        return draw(st.sampled_from(SCALAR_FROM_TWO_VECTORS)).format(a, b)
    if kind == "binary":
        a, b = draw(scalar_expressions(depth - 1)), draw(scalar_expressions(depth - 1))
        return draw(st.sampled_from(SCALAR_BINARY)).format(a, b)
    return draw(st.sampled_from(SCALAR_UNARY)).format(draw(scalar_expressions(depth - 1)))


def points(*shape: int) -> st.SearchStrategy[np.ndarray]:
    return arrays(np.float64, shape, elements=st.floats(-1.5, 1.5, allow_nan=False, allow_infinity=False))


# -- helpers -------------------------------------------------------------------------------------


def run(expression: str, variables: Arrays, derivatives: tuple[str, ...], **extra: Any) -> GradientResult:
    job = GradientJob(
        expression=expression,
        variables=variables,
        constants=CONSTANTS,
        derivatives=derivatives,
        dtype="float64",
        **extra,
    )
    return execute(job)


def assert_scaled_close(
    actual: Any, expected: Any, what: str, tolerance: Tolerance, scale: float = 0.0, uncertainty: Any = 0.0
) -> None:
    """``tolerance`` scaled to the magnitude of ``expected`` (or ``scale``, that of the terms that sum
    to it), widened by four times ``uncertainty``: the reference's own error estimate (finite differences)."""
    reference_error = 4 * float(np.max(np.abs(uncertainty), initial=0.0))
    assert_close(actual, expected, tolerance.scaled(expected, scale).widened(reference_error), what)


def full_hessian(hessian: dict[str, Arrays]) -> np.ndarray:
    """The blocks {a: {b: (3, 3)}} as one (6, 6) matrix over the concatenated variables."""
    return np.block([[hessian[a][b] for b in VARIABLES] for a in VARIABLES])


# -- tests ---------------------------------------------------------------------------------------


@SETTINGS
@given(expression=scalar_expressions(), x=points(N), y=points(N), vx=points(N), vy=points(N))
def test_scalar_expression_gradient_hessian_hvp(
    expression: str, x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray
) -> None:
    note(f"expression: {expression}")
    variables = {"x": x, "y": y}
    tangents = {"x": vx, "y": vy}
    derivatives = ("gradient", "hessian", "hvp")

    def at(v: Arrays) -> GradientResult:
        return run(expression, v, derivatives, tangents=tangents)

    r = at(variables)
    assert r.value.shape == ()
    assert r.gradient is not None and r.hessian is not None and r.hvp is not None
    for name in VARIABLES:
        fd = finite_difference(lambda v: at(v).value, variables, name, FIRST_ORDER_STEP, 3)
        scale = float(np.abs(r.value))
        assert_scaled_close(r.gradient[name], fd, f"d/d{name}", FINITE_DIFFERENCE, scale=scale)

    h = full_hessian(r.hessian)
    assert_scaled_close(h, h.T, "Hessian symmetry", DERIVED_CHAIN)
    for a in VARIABLES:
        for b in VARIABLES:

            def grad(v: Arrays, a: str = a) -> np.ndarray:
                return at(v).gradient[a]  # type: ignore[index]

            fd = finite_difference(grad, variables, b, SECOND_ORDER_STEP, 5)
            # Richardson: the stencil's own error, from the same stencil at half the step. Strongly
            # oscillating compositions (sin(sin(p**2)) with p up to 27) leave it far above RTOL.
            half = finite_difference(grad, variables, b, SECOND_ORDER_STEP / 2, 5)
            assert_scaled_close(r.hessian[a][b], fd, f"d2/d{a}d{b}", FINITE_DIFFERENCE, uncertainty=fd - half)

    v = np.concatenate([vx, vy])
    hv = h @ v
    assert_scaled_close(
        np.concatenate([r.hvp["x"], r.hvp["y"]]),
        hv,
        "hvp = H v",
        DERIVED_CHAIN,
        scale=float(np.abs(h).max() * np.abs(v).max()),
    )


@SETTINGS
@given(expression=vector_expressions(), x=points(N), y=points(N), vx=points(N), vy=points(N), u=points(N))
def test_vector_expression_jacobian_jvp_vjp(
    expression: str, x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray, u: np.ndarray
) -> None:
    note(f"expression: {expression}")
    variables = {"x": x, "y": y}
    tangents = {"x": vx, "y": vy}
    derivatives = ("gradient", "jacobian", "jvp", "vjp")

    def at(v: Arrays) -> GradientResult:
        return run(expression, v, derivatives, tangents=tangents, cotangent=u)

    r = at(variables)
    assert r.value.shape == (N,)
    assert r.jacobian is not None and r.jvp is not None and r.vjp is not None and r.gradient is not None
    for name in VARIABLES:
        fd = finite_difference(lambda v: at(v).value, variables, name, FIRST_ORDER_STEP, 3)
        scale = float(np.abs(r.value).max())
        assert_scaled_close(r.jacobian[name], fd, f"Jacobian d/d{name}", FINITE_DIFFERENCE, scale=scale)
        # the gradient of a non-scalar value is the gradient of its sum
        column_sums = r.jacobian[name].sum(axis=0)
        assert_scaled_close(r.gradient[name], column_sums, f"gradient d/d{name}", DERIVED_CHAIN)

    j = np.concatenate([r.jacobian["x"], r.jacobian["y"]], axis=1)  # (3, 6)
    v = np.concatenate([vx, vy])
    scale = float(np.abs(j).max()) * 1.5 * N * 2
    assert_scaled_close(r.jvp, j @ v, "jvp = J v", DERIVED_CHAIN, scale=scale)
    vjp = np.concatenate([r.vjp["x"], r.vjp["y"]])
    assert_scaled_close(vjp, u @ j, "vjp = u J", DERIVED_CHAIN, scale=scale)


BATCH = 4


@BATCH_SETTINGS
@given(
    expression=scalar_expressions(),
    x=points(BATCH, N),
    y=points(BATCH, N),
    vx=points(BATCH, N),
    vy=points(BATCH, N),
)
def test_batch_equals_unbatched_per_point(
    expression: str, x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray
) -> None:
    note(f"expression: {expression}")
    derivatives = ("gradient", "hessian", "hvp")
    batched = run(expression, {"x": x, "y": y}, derivatives, tangents={"x": vx, "y": vy}, batch=True)
    assert batched.value.shape == (BATCH,)
    assert batched.gradient is not None and batched.hessian is not None and batched.hvp is not None
    for i in range(BATCH):
        single = run(expression, {"x": x[i], "y": y[i]}, derivatives, tangents={"x": vx[i], "y": vy[i]})
        assert single.gradient is not None and single.hessian is not None and single.hvp is not None
        assert_scaled_close(batched.value[i], single.value, f"value at point {i}", DERIVED_CHAIN)
        for a in VARIABLES:
            gradient = single.gradient[a]
            assert_scaled_close(batched.gradient[a][i], gradient, f"d/d{a} at point {i}", DERIVED_CHAIN)
            assert_scaled_close(batched.hvp[a][i], single.hvp[a], f"hvp {a} at point {i}", DERIVED_CHAIN)
            for b in VARIABLES:
                assert_scaled_close(
                    batched.hessian[a][b][i], single.hessian[a][b], f"d2/d{a}d{b} at point {i}", DERIVED_CHAIN
                )
