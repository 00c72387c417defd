"""scan, fori, grad and hvp through the engine, against closed forms and float64 finite differences.

Each construct is checked for its value and for every derivative kind the engine offers (gradient,
Jacobian, Hessian, HVP, JVP, VJP, order k); loops also for their size bound, for a graph that does
not grow with the trip count, and under batch. References are numpy loops written independently of
the expression, or closed forms; derivatives without a closed form are central differences of the
numpy reference (first order) or of the engine's own gradient (second order, as in
test_functions_fd.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.engine import execute
from service.engine.runner import _compile
from service.errors import InvalidRequest, LimitExceeded, ShapeError
from service.jobs import GradientJob, GradientResult
from service.limits import Limits
from tests.engine.finite_differences import Arrays, finite_difference
from tests.tolerances import CLOSED_FORM, DERIVED_CHAIN, FINITE_DIFFERENCE, STACKED, assert_close

FIRST_ORDER_STEP = 1e-6  # float64 central differences: truncation ~h**2, rounding ~1e-16 / h
SECOND_ORDER_STEP = 1e-3  # 5-point stencil of the engine's gradient: truncation ~h**4


def run(expression: str, variables: Arrays, functions: dict[str, Any], **extra: Any) -> GradientResult:
    job = GradientJob(
        expression=expression, variables=variables, functions=functions, dtype="float64", **extra
    )
    result = execute(job)
    assert isinstance(result, GradientResult)
    return result


def engine_gradient(expression: str, functions: dict[str, Any], name: str) -> Any:
    def gradient(variables: Arrays) -> np.ndarray:
        result = run(expression, variables, functions, derivatives=("gradient",))
        assert result.gradient is not None
        return result.gradient[name]

    return gradient


# -- scan: a recurrent cell, carries stacked ----------------------------------------------------

RNN = {"cell": {"params": ["h", "x", "w", "u"], "body": "tanh(w * h + u * x)"}}
RNN_VARIABLES = {
    "h0": np.array([0.3, -0.2, 0.5]),
    "w": np.array([0.9, -0.7, 1.1]),
    "u": np.array([0.4, 0.8, -0.6]),
}
XS = np.array([[0.5, -1.0, 0.2], [1.2, 0.3, -0.4], [-0.7, 0.9, 0.6], [0.1, -0.5, 1.3]])


def rnn_states(p: Arrays) -> np.ndarray:
    h, states = p["h0"], []
    for x in XS:
        h = np.tanh(p["w"] * h + p["u"] * x)
        states.append(h)
    return np.array(states)


def rnn_loss(p: Arrays) -> float:
    return float(np.sum(rnn_states(p) * np.arange(1, 4)))


SCAN_LOSS = "sum(scan(cell, h0, xs, w, u) * [1, 2, 3])"


def rnn_run(expression: str, variables: Arrays, **extra: Any) -> GradientResult:
    job = GradientJob(
        expression=expression,
        variables=variables,
        constants={"xs": XS},
        functions=RNN,
        dtype="float64",
        **extra,
    )
    result = execute(job)
    assert isinstance(result, GradientResult)
    return result


def test_scan_value_and_gradient_against_a_numpy_loop() -> None:
    result = rnn_run(SCAN_LOSS, RNN_VARIABLES, derivatives=("gradient",))
    assert_close(result.value, rnn_loss(RNN_VARIABLES), CLOSED_FORM, "value")
    assert result.gradient is not None
    for name in RNN_VARIABLES:
        expected = finite_difference(rnn_loss, RNN_VARIABLES, name, FIRST_ORDER_STEP, 3)
        assert_close(result.gradient[name], expected, FINITE_DIFFERENCE, f"gradient {name}")


def test_scan_stacks_every_carry_and_its_jacobian_and_vjp_are_right() -> None:
    cotangent = np.linspace(-1.0, 1.0, 12).reshape(4, 3)
    result = rnn_run(
        "scan(cell, h0, xs, w, u)", RNN_VARIABLES, derivatives=("jacobian", "vjp"), cotangent=cotangent
    )
    assert_close(result.value, rnn_states(RNN_VARIABLES), CLOSED_FORM, "stacked carries")
    assert result.jacobian is not None and result.vjp is not None
    for name in RNN_VARIABLES:
        expected = finite_difference(rnn_states, RNN_VARIABLES, name, FIRST_ORDER_STEP, 3)
        assert_close(result.jacobian[name], expected, FINITE_DIFFERENCE, f"jacobian {name}")
        vjp = np.tensordot(cotangent, expected, axes=2)
        assert_close(result.vjp[name], vjp, FINITE_DIFFERENCE.scaled(vjp), f"vjp {name}")


def test_scan_second_derivatives_hessian_hvp_jvp_and_order_2() -> None:
    tangents = {"h0": np.array([1.0, -0.5, 0.2]), "w": np.array([0.3, 0.1, -0.8]), "u": np.zeros(3)}
    result = rnn_run(
        SCAN_LOSS, RNN_VARIABLES, derivatives=("gradient", "hessian", "hvp", "jvp"), tangents=tangents
    )
    assert result.hessian is not None and result.hvp is not None and result.gradient is not None
    for a in RNN_VARIABLES:
        for b in RNN_VARIABLES:
            # d/d b of the gradient in a: the Hessian block (a, b)
            expected = finite_difference(engine_gradient_rnn(a), RNN_VARIABLES, b, SECOND_ORDER_STEP, 5)
            assert_close(
                result.hessian[a][b], expected, FINITE_DIFFERENCE.scaled(expected), f"hessian {a},{b}"
            )
    for a in RNN_VARIABLES:
        hv = sum(result.hessian[a][b] @ tangents[b] for b in RNN_VARIABLES)
        assert_close(result.hvp[a], hv, DERIVED_CHAIN.scaled(hv), f"hvp {a}")
    jvp = sum(result.gradient[b] @ tangents[b] for b in RNN_VARIABLES)
    assert_close(result.jvp, jvp, DERIVED_CHAIN.scaled(jvp), "jvp")
    higher = rnn_run(SCAN_LOSS, RNN_VARIABLES, order=2, wrt=("w",)).higher
    assert higher is not None
    assert_close(higher["derivatives"][1], result.hessian["w"]["w"], DERIVED_CHAIN, "order 2")


def engine_gradient_rnn(name: str) -> Any:
    def gradient(variables: Arrays) -> np.ndarray:
        result = rnn_run(SCAN_LOSS, variables, derivatives=("gradient",))
        assert result.gradient is not None
        return result.gradient[name]

    return gradient


# -- fori: RK4 on a linear ODE has a closed form ----------------------------------------------

# Written out as two functions so that each stage is computed once, as a person would write it.
RK4 = {
    "rhs": {"params": ["y", "a"], "body": "a * y"},
    "stages": {
        "params": ["y", "a", "h", "k1", "k2"],
        "body": "k1 + 2 * k2 + 2 * rhs(y + h / 2 * k2, a) + rhs(y + h * rhs(y + h / 2 * k2, a), a)",
    },
    "rk4": {
        "params": ["i", "y", "a", "h"],
        "body": "y + h / 6 * stages(y, a, h, rhs(y, a), rhs(y + h / 2 * rhs(y, a), a))",
    },
}


def rk4_closed_form(y0: np.ndarray, a: np.ndarray, h: float, n: int) -> tuple[np.ndarray, ...]:
    """RK4 on y' = a y multiplies y by R(ha) = 1 + z + z^2/2 + z^3/6 + z^4/24 per step."""
    z = h * a
    r = 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24
    dr = (1 + z + z**2 / 2 + z**3 / 6) * h  # dR/da
    d2r = (1 + z + z**2 / 2) * h * h
    y = y0 * r**n
    dy_dy0 = r**n
    dy_da = y0 * n * r ** (n - 1) * dr
    d2y_da2 = y0 * (n * (n - 1) * r ** (n - 2) * dr**2 + n * r ** (n - 1) * d2r)
    d2y_dy0da = n * r ** (n - 1) * dr
    return y, dy_dy0, dy_da, d2y_da2, d2y_dy0da


@pytest.mark.parametrize("steps", [1, 25])
def test_fori_rk4_matches_its_closed_form_for_every_derivative(steps: int) -> None:
    y0, a, h = np.array([1.0, -0.5]), np.array([-0.8, 0.3]), 0.05
    tangents = {"y0": np.array([0.4, -1.0]), "a": np.array([0.7, 0.2])}
    result = run(
        f"sum(fori({steps}, rk4, y0, a, 0.05))",
        {"y0": y0, "a": a},
        RK4,
        derivatives=("gradient", "hessian", "hvp", "jvp", "jacobian"),
        tangents=tangents,
    )
    y, dy_dy0, dy_da, d2y_da2, d2y_dy0da = rk4_closed_form(y0, a, h, steps)
    assert result.gradient is not None and result.hessian is not None and result.hvp is not None
    assert_close(result.value, np.sum(y), CLOSED_FORM, "value")
    assert_close(result.gradient["y0"], dy_dy0, DERIVED_CHAIN, "d/dy0")
    assert_close(result.gradient["a"], dy_da, DERIVED_CHAIN, "d/da")
    assert result.jacobian is not None
    assert_close(result.jacobian["a"], dy_da, DERIVED_CHAIN, "jacobian of a scalar")
    assert_close(result.hessian["a"]["a"], np.diag(d2y_da2), DERIVED_CHAIN.scaled(d2y_da2), "d2/da2")
    assert_close(result.hessian["y0"]["a"], np.diag(d2y_dy0da), DERIVED_CHAIN, "d2/dy0 da")
    assert_close(result.hessian["y0"]["y0"], np.zeros((2, 2)), DERIVED_CHAIN, "linear in y0")
    hv_a = d2y_dy0da * tangents["y0"] + d2y_da2 * tangents["a"]
    assert_close(result.hvp["a"], hv_a, DERIVED_CHAIN.scaled(hv_a), "hvp a")
    jvp = dy_dy0 @ tangents["y0"] + dy_da @ tangents["a"]
    assert_close(result.jvp, jvp, DERIVED_CHAIN.scaled(jvp), "jvp")


def test_the_traced_graph_does_not_grow_with_the_trip_count() -> None:
    # One step or ten thousand: the same ops, the trip count is a number in the loop's condition.
    def ops(steps: int) -> int:
        job = GradientJob(
            expression=f"sum(fori({steps}, rk4, y0, a, 0.001))",
            variables={"y0": np.ones(2), "a": np.ones(2)},
            functions=RK4,
            derivatives=("gradient", "hessian"),
            dtype="float64",
        )
        graph = _compile(job, Limits()).graph
        assert graph is not None
        return len(graph.get_operations())

    assert ops(10) == ops(10_000)


def test_a_loop_counts_its_steps_against_the_element_limit() -> None:
    limits = Limits(max_tensor_elements=10_000)
    functions = {
        "double": {"params": ["i", "c"], "body": "c * 2"},
        "add": {"params": ["c", "x"], "body": "c + x"},
    }

    def job(expression: str, x: np.ndarray) -> GradientJob:
        return GradientJob(
            expression=expression,
            variables={"x": x},
            functions=functions,
            derivatives=("gradient",),
            dtype="float64",
        )

    result = execute(job("sum(fori(100, double, x))", np.ones(100)), limits)  # 100 steps x 100 = 10,000
    assert_close(result.gradient["x"], np.full(100, 2.0**100), CLOSED_FORM)
    with pytest.raises(LimitExceeded) as caught:
        execute(job("sum(fori(101, double, x))", np.ones(100)), limits)
    error = caught.value.to_dict()
    assert error["limit"] == "max_tensor_elements" and error["estimate"] == 10_100
    assert error["construct"] == "fori(101, double, ...)" and error["column"] == 5
    # Nested loops multiply: 10 outer steps of an inner loop of 11 steps over 100 elements.
    functions["inner"] = {"params": ["i", "c"], "body": "fori(11, double, c)"}
    with pytest.raises(LimitExceeded) as caught:
        execute(job("sum(fori(10, inner, x))", np.ones(100)), limits)
    assert caught.value.to_dict()["estimate"] == 11_000
    # scan's stacked carries: 101 rows of 100 elements.
    with pytest.raises(LimitExceeded) as caught:
        execute(job("sum(scan(add, x, ones([101, 1])))", np.ones(100)), limits)
    assert "scan(add, ...) over 101 rows" in caught.value.detail


def test_a_batch_of_points_through_a_scan_matches_each_point_alone() -> None:
    points = np.array([[0.3, -0.2, 0.5], [0.1, 0.4, -0.9], [-0.6, 0.2, 0.0]])
    constants = {"xs": XS, "w": RNN_VARIABLES["w"], "u": RNN_VARIABLES["u"]}

    def job(h0: np.ndarray, batch: bool) -> GradientJob:
        return GradientJob(
            expression="sum(scan(cell, h0, xs, w, u)[-1])",
            variables={"h0": h0},
            constants=constants,
            functions=RNN,
            derivatives=("gradient", "hessian"),
            dtype="float64",
            batch=batch,
        )

    batched = execute(job(points, True))
    assert batched.gradient is not None and batched.hessian is not None
    for i, point in enumerate(points):
        alone = execute(job(point, False))
        assert alone.gradient is not None and alone.hessian is not None
        assert_close(batched.value[i], alone.value, STACKED, f"value {i}")
        assert_close(batched.gradient["h0"][i], alone.gradient["h0"], STACKED, f"gradient {i}")
        assert_close(batched.hessian["h0"]["h0"][i], alone.hessian["h0"]["h0"], STACKED, f"hessian {i}")


# -- grad and hvp inside expressions -----------------------------------------------------------

QUARTIC = {
    "f": {"params": ["x"], "body": "sum(x**4) / 12"},
    "g": {"params": ["x", "a"], "body": "sum(a * x**2)"},
}
X = np.array([0.7, -1.2, 0.4])
V = np.array([0.5, 0.3, -1.1])


def test_grad_inside_an_expression_is_differentiated_again() -> None:
    # grad f = x**3 / 3; the outer derivatives are those of sum(w * x**3 / 3).
    w = np.array([1.0, -2.0, 0.5])
    result = run(
        "sum(w * grad(f, x))",
        {"x": X, "w": w},
        QUARTIC,
        derivatives=("gradient", "hessian", "jacobian"),
    )
    assert result.gradient is not None and result.hessian is not None
    assert_close(result.value, np.sum(w * X**3 / 3), CLOSED_FORM, "value")
    assert_close(result.gradient["x"], w * X**2, CLOSED_FORM, "d/dx")
    assert_close(result.gradient["w"], X**3 / 3, CLOSED_FORM, "d/dw")
    assert_close(result.hessian["x"]["x"], np.diag(2 * w * X), CLOSED_FORM, "d2/dx2")
    assert_close(result.hessian["x"]["w"], np.diag(X**2), CLOSED_FORM, "d2/dx dw")
    third = run("sum(w * grad(f, x))", {"x": X, "w": w}, QUARTIC, order=3, wrt=("x",)).higher
    assert third is not None
    expected = np.zeros((3, 3, 3))
    expected[np.arange(3), np.arange(3), np.arange(3)] = 2 * w
    assert_close(third["derivatives"][2], expected, DERIVED_CHAIN, "order 3")


def test_grad_differentiates_its_first_parameter_only() -> None:
    # g(x, a) = sum(a x**2): dg/dx = 2 a x, even when a is the same tensor as x (then 2 x**2, not 3 x**2).
    result = run("sum(grad(g, x, x))", {"x": X}, QUARTIC, derivatives=("gradient",))
    assert_close(result.value, np.sum(2 * X**2), CLOSED_FORM, "value")
    assert result.gradient is not None
    assert_close(result.gradient["x"], 4 * X, CLOSED_FORM, "outer gradient")


def test_nested_grad_is_a_gradient_of_a_gradient() -> None:
    functions = {
        "f": {"params": ["x"], "body": "sum(x**3) / 3"},  # grad f = x**2
        "g": {"params": ["x"], "body": "sum(grad(f, x)**2)"},  # sum x**4, grad g = 4 x**3
    }
    result = run("sum(grad(g, x))", {"x": X}, functions, derivatives=("gradient", "hessian"))
    assert_close(result.value, np.sum(4 * X**3), CLOSED_FORM, "value")
    assert result.gradient is not None and result.hessian is not None
    assert_close(result.gradient["x"], 12 * X**2, CLOSED_FORM, "gradient")
    assert_close(result.hessian["x"]["x"], np.diag(24 * X), DERIVED_CHAIN, "hessian")


def test_hvp_inside_an_expression_and_its_outer_derivatives() -> None:
    # f = sum(x**4) / 12 has Hessian diag(x**2): hvp = x**2 v.
    tangents = {"x": np.array([1.0, 0.0, -1.0]), "v": np.array([0.2, 0.5, 0.1])}
    result = run(
        "sum(hvp(f, x, v))",
        {"x": X, "v": V},
        QUARTIC,
        derivatives=("gradient", "hvp", "jvp"),
        tangents=tangents,
    )
    assert result.gradient is not None and result.hvp is not None
    assert_close(result.value, np.sum(X**2 * V), CLOSED_FORM, "value")
    assert_close(result.gradient["x"], 2 * X * V, CLOSED_FORM, "d/dx")
    assert_close(result.gradient["v"], X**2, CLOSED_FORM, "d/dv")
    # Hessian of sum(x**2 v): d2/dx2 = diag(2 v), d2/dx dv = diag(2 x), d2/dv2 = 0
    assert_close(result.hvp["x"], 2 * V * tangents["x"] + 2 * X * tangents["v"], CLOSED_FORM, "hvp x")
    assert_close(result.hvp["v"], 2 * X * tangents["x"], CLOSED_FORM, "hvp v")
    jvp = 2 * X * V @ tangents["x"] + X**2 @ tangents["v"]
    assert_close(result.jvp, jvp, CLOSED_FORM, "jvp")


# -- gradient descent inside the objective (GradBench's particle and saddle pattern) ---------------

DESCENT = {
    "energy": {"params": ["x", "p"], "body": "sum((x - p)**2) / 2 + sum(x**4) / 10"},
    "descend": {"params": ["i", "x", "p"], "body": "x - 0.1 * grad(energy, x, p)"},
}
DESCENT_EXPRESSION = "sum(sin(fori(5, descend, x0, p)) * [1, -2])"


def descent_objective(v: Arrays) -> float:
    x = v["x0"].copy()
    for _ in range(5):
        x = x - 0.1 * ((x - v["p"]) + 0.4 * x**3)
    return float(np.sum(np.sin(x) * np.array([1.0, -2.0])))


def test_gradient_steps_inside_the_objective_have_the_right_outer_derivatives() -> None:
    variables = {"x0": np.array([0.8, -0.3]), "p": np.array([0.2, 0.6])}
    result = run(DESCENT_EXPRESSION, variables, DESCENT, derivatives=("gradient", "hessian"))
    assert_close(result.value, descent_objective(variables), CLOSED_FORM, "value")
    assert result.gradient is not None and result.hessian is not None
    for name in variables:
        expected = finite_difference(descent_objective, variables, name, FIRST_ORDER_STEP, 3)
        assert_close(result.gradient[name], expected, FINITE_DIFFERENCE, f"gradient {name}")
    expected = finite_difference(
        engine_gradient(DESCENT_EXPRESSION, DESCENT, "p"), variables, "p", SECOND_ORDER_STEP, 5
    )
    assert_close(result.hessian["p"]["p"], expected, FINITE_DIFFERENCE.scaled(expected), "hessian p")


# -- misuse that only shapes reveal ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "functions", "message"),
    [
        ("sum(grad(f, x))", {"f": {"params": ["x"], "body": "x * 2"}}, "needs f() to return a scalar"),
        ("sum(hvp(f, x, [1, 2]))", {"f": {"params": ["x"], "body": "sum(x)"}}, "v of the shape of x"),
        ("sum(fori(3, s, x))", {"s": {"params": ["i", "c"], "body": "sum(c)"}}, "carry keeps its shape"),
        ("sum(scan(s, x, 2.0))", {"s": {"params": ["c", "y"], "body": "c"}}, "this xs is a scalar"),
    ],
)
def test_shape_misuse_is_a_located_422(expression: str, functions: dict[str, Any], message: str) -> None:
    with pytest.raises(ShapeError) as caught:
        run(expression, {"x": X}, functions, derivatives=("gradient",))
    body = caught.value.to_dict()
    assert message in body["detail"], body["detail"]
    assert caught.value.status == 422 and body["line"] == 1 and body["column"] == 5


def test_derivatives_inside_count_towards_the_highest_order() -> None:
    with pytest.raises(LimitExceeded) as caught:
        run("sum(hvp(f, x, x))", {"x": X}, QUARTIC, order=3)
    assert caught.value.to_dict()["limit"] == "max_order" and "5 in all" in caught.value.detail
    run("sum(hvp(f, x, x))", {"x": X}, QUARTIC, derivatives=("hessian",))  # 2 + 2 = 4: allowed


NEWTON = {
    "f": {"params": ["x", "c"], "body": "sum(x**3 / 3 - c * x)"},  # gradient x**2 - c, Hessian diag(2x)
    "newton": {"params": ["i", "x", "c"], "body": "x - grad(f, x, c) / hvp(f, x, ones_like(x), c)"},
}


def newton_objective(v: Arrays) -> float:
    x = v["x0"].copy()
    for _ in range(3):
        x = x - (x**2 - v["c"]) / (2 * x)
    return float(np.sum(x * np.array([1.0, 0.5])))


def test_newton_steps_with_grad_and_hvp_inside_a_loop() -> None:
    # f is separable, so its Hessian is diagonal and hvp with ones is that diagonal: Newton's
    # iteration for sqrt(c), three steps, then differentiated in the start and in c.
    expression = "sum(fori(3, newton, x0, c) * [1, 0.5])"
    variables = {"x0": np.array([1.3, 2.5]), "c": np.array([2.0, 5.0])}
    result = run(expression, variables, NEWTON, derivatives=("gradient", "hessian"))
    assert_close(result.value, newton_objective(variables), CLOSED_FORM, "value")
    assert result.gradient is not None and result.hessian is not None
    for name in variables:
        expected = finite_difference(newton_objective, variables, name, FIRST_ORDER_STEP, 3)
        assert_close(result.gradient[name], expected, FINITE_DIFFERENCE.scaled(expected), f"gradient {name}")
    expected = finite_difference(
        engine_gradient(expression, NEWTON, "c"), variables, "c", SECOND_ORDER_STEP, 5
    )
    assert_close(result.hessian["c"]["c"], expected, FINITE_DIFFERENCE.scaled(expected), "hessian c")


SADDLE = {
    "f": {"params": ["a", "b"], "body": "sum(a**2) - sum(b**2) + sum(a * b) / 2 + sum(a**4) / 10"},
    "f_in_b": {"params": ["b", "a"], "body": "f(a, b)"},  # grad differentiates the first parameter
    "ascend": {"params": ["i", "b", "a"], "body": "b + 0.2 * grad(f_in_b, b, a)"},
    "best_reply": {"params": ["a", "b0"], "body": "f(a, fori(4, ascend, b0, a))"},
    "descend": {"params": ["i", "a", "b0"], "body": "a - 0.2 * grad(best_reply, a, b0)"},
}


def saddle_objective(v: Arrays) -> float:
    """The same iteration with hand-derived gradients: b after 4 ascent steps is 0.6**4 b0 + 0.2176 a."""
    a, b0 = v["a0"].copy(), v["b0"]
    for _ in range(4):
        b = b0.copy()
        for _ in range(4):
            b = b + 0.2 * (-2 * b + a / 2)
        # total derivative of f(a, b(a)) in a: df/da + (db/da) df/db, db/da = 0.2176 I
        a = a - 0.2 * (2 * a + b / 2 + 0.4 * a**3 + 0.2176 * (-2 * b + a / 2))
    return float(np.sum(a * np.array([1.0, -1.5])))


def test_descent_on_a_best_reply_found_by_ascent_nests_derivatives_twice() -> None:
    # GradBench's saddle pattern: the inner loop's grad sits inside the function the outer grad
    # differentiates, and the engine's gradient is a third tape around both.
    expression = "sum(fori(4, descend, a0, b0) * [1, -1.5])"
    variables = {"a0": np.array([1.0, -0.5]), "b0": np.array([0.3, 0.2])}
    result = run(expression, variables, SADDLE, derivatives=("gradient",))
    assert_close(result.value, saddle_objective(variables), CLOSED_FORM, "value")
    assert result.gradient is not None
    for name in variables:
        expected = finite_difference(saddle_objective, variables, name, FIRST_ORDER_STEP, 3)
        assert_close(result.gradient[name], expected, FINITE_DIFFERENCE.scaled(expected), f"gradient {name}")


def test_a_constant_step_count_is_the_literal_and_enters_the_bounds() -> None:
    # fori(n, ...) with a request constant n: the same program as the literal, n in its signature,
    # and n's steps counted against the element limit like a literal's.
    y0, a = np.array([1.0, -0.5]), np.array([-0.8, 0.3])

    def job(expression: str, constants: Arrays, counts: tuple[str, ...]) -> GradientJob:
        return GradientJob(
            expression=expression,
            variables={"y0": y0, "a": a},
            constants=constants,
            functions=RK4,
            derivatives=("gradient", "hessian"),
            dtype="float64",
            counts=counts,
        )

    named = job("sum(fori(n, rk4, y0, a, 0.05))", {"n": np.array(25.0)}, ("n",))
    literal = job("sum(fori(25, rk4, y0, a, 0.05))", {}, ())
    by_name, by_literal = execute(named), execute(literal)
    assert isinstance(by_name, GradientResult) and isinstance(by_literal, GradientResult)
    y, dy_dy0, dy_da, d2y_da2, _ = rk4_closed_form(y0, a, 0.05, 25)
    assert_close(by_name.value, np.sum(y), CLOSED_FORM, "value")
    assert by_name.gradient is not None and by_literal.gradient is not None
    assert_close(by_name.gradient["a"], dy_da, DERIVED_CHAIN, "d/da")
    assert by_name.hessian is not None
    assert_close(by_name.hessian["a"]["a"], np.diag(d2y_da2), DERIVED_CHAIN.scaled(d2y_da2), "d2/da2")
    # two compiled programs (Grappler may fold the literal one differently): equal to rounding
    assert_close(by_name.gradient["y0"], by_literal.gradient["y0"], CLOSED_FORM, "named vs literal")
    other = job("sum(fori(n, rk4, y0, a, 0.05))", {"n": np.array(3.0)}, ("n",))
    assert other.signature() != named.signature()
    y3 = rk4_closed_form(y0, a, 0.05, 3)[0]
    assert_close(execute(other).value, np.sum(y3), CLOSED_FORM, "value after 3 steps")

    limits = Limits(max_tensor_elements=10_000)
    doubling = GradientJob(
        expression="sum(fori(n, double, x))",
        variables={"x": np.ones(100)},
        constants={"n": np.array(101.0)},
        functions={"double": {"params": ["i", "c"], "body": "c * 2"}},
        dtype="float64",
        counts=("n",),
    )
    with pytest.raises(LimitExceeded) as caught:
        execute(doubling, limits)
    assert caught.value.to_dict()["construct"] == "fori(101, double, ...)"
    # the engine's own check refuses what the API would: a count that is not one integer
    doubling.constants["n"] = np.array(2.5)
    with pytest.raises(InvalidRequest, match="constants.n is the step count"):
        execute(doubling, limits)
