"""Tape programs against closed forms: the guide's examples, Rosenbrock, custom gradients, batches."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.engine import execute
from service.errors import (
    EvaluationError,
    InvalidRequest,
    LimitExceeded,
    ShapeError,
    TapeserveError,
)
from service.jobs import GradientJob
from service.limits import Limits
from tests.tolerances import CLOSED_FORM, DERIVED_CHAIN, EXACT, assert_close

ROSEN = "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)"


def job(expression: str, **kwargs: Any) -> GradientJob:
    variables = {k: np.asarray(v, dtype=np.float64) for k, v in kwargs.pop("variables", {}).items()}
    kwargs.setdefault("dtype", "float64")
    return GradientJob(expression, variables, **kwargs)


def rosen_grad(x: np.ndarray) -> np.ndarray:
    g = np.zeros_like(x)
    g[:-1] = -400 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2 * (1 - x[:-1])
    g[1:] += 200 * (x[1:] - x[:-1] ** 2)
    return g


def rosen_hess(x: np.ndarray) -> np.ndarray:
    n = len(x)
    h = np.zeros((n, n))
    for i in range(n - 1):
        h[i, i] += 1200 * x[i] ** 2 - 400 * x[i + 1] + 2
        h[i, i + 1] = h[i + 1, i] = -400 * x[i]
        h[i + 1, i + 1] += 200
    return h


def test_the_guides_first_and_second_derivative_of_x_squared() -> None:
    result = execute(
        GradientJob("x**2", {"x": np.array(3.0, np.float32)}, derivatives=("gradient", "hessian"))
    )
    assert result.value == 9.0
    assert result.gradient == {"x": 6.0}
    assert result.hessian == {"x": {"x": 2.0}}


def test_the_guides_custom_relu() -> None:
    functions = {
        "custom_relu": {"params": ["x"], "body": "maximum(0.0, x)", "gradient": {"x": "dy * (x > 0)"}}
    }
    result = execute(
        GradientJob("custom_relu(x)", {"x": np.array([-2.0, 0.0, 2.0], np.float32)}, functions=functions)
    )
    assert_close(result.value, [0.0, 0.0, 2.0], EXACT, "value")
    assert result.gradient is not None
    assert_close(result.gradient["x"], [0.0, 0.0, 1.0], EXACT, "gradient")


def test_rosenbrock_gradient_and_hessian_match_closed_forms() -> None:
    x = np.random.default_rng(0).uniform(-2, 2, 10)
    result = execute(job(ROSEN, variables={"x": x}, derivatives=("gradient", "hessian")))
    assert result.gradient is not None and result.hessian is not None
    expected_value = np.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)
    assert_close(result.value, expected_value, CLOSED_FORM, "value")
    assert_close(result.gradient["x"], rosen_grad(x), CLOSED_FORM, "gradient")
    assert_close(result.hessian["x"]["x"], rosen_hess(x), CLOSED_FORM, "hessian")


def test_every_derivative_comes_from_one_program_and_is_consistent() -> None:
    rng = np.random.default_rng(1)
    x, v, u = rng.normal(size=10), rng.normal(size=10), rng.normal()
    result = execute(
        job(
            ROSEN,
            variables={"x": x},
            derivatives=("gradient", "jacobian", "hessian", "hvp", "jvp", "vjp"),
            tangents={"x": v},
            cotangent=np.array(u),
        )
    )
    assert result.hvp is not None and result.vjp is not None and result.jacobian is not None
    assert_close(result.hvp["x"], rosen_hess(x) @ v, DERIVED_CHAIN, "hvp")
    assert_close(result.jvp, rosen_grad(x) @ v, DERIVED_CHAIN, "jvp")
    assert_close(result.vjp["x"], u * rosen_grad(x), DERIVED_CHAIN, "vjp")
    assert_close(result.jacobian["x"], rosen_grad(x), DERIVED_CHAIN, "jacobian")


def test_programs_are_cached_per_signature() -> None:
    first = execute(job("sum(x**3) + 0.5", variables={"x": [1.0, 2.0]}))
    second = execute(job("sum(x**3) + 0.5", variables={"x": [3.0, 4.0]}))
    other_shape = execute(job("sum(x**3) + 0.5", variables={"x": [3.0, 4.0, 5.0]}))
    assert (first.cache, second.cache, other_shape.cache) == ("miss", "hit", "miss")
    assert second.gradient is not None
    assert_close(second.gradient["x"], [27.0, 48.0], CLOSED_FORM, "gradient")


def test_vector_valued_jacobian_and_sum_semantics_of_gradient() -> None:
    x = np.array([0.3, -1.2, 2.0])
    result = execute(job("sin(x) * x[0]", variables={"x": x}, derivatives=("gradient", "jacobian")))
    assert result.jacobian is not None and result.gradient is not None
    expected = np.diag(np.cos(x) * x[0])
    expected[:, 0] += np.sin(x)
    assert_close(result.jacobian["x"], expected, CLOSED_FORM, "jacobian")
    assert_close(result.gradient["x"], expected.sum(axis=0), CLOSED_FORM, "gradient")


def test_unused_and_non_wrt_variables() -> None:
    result = execute(job("a * 2", variables={"a": 1.0, "b": [1.0, 2.0]}, derivatives=("gradient", "hessian")))
    assert result.gradient is not None and result.hessian is not None
    assert_close(result.gradient["b"], [0.0, 0.0], EXACT, "gradient of the unused b")
    assert result.hessian["a"]["b"].shape == (2,) and result.hessian["b"]["b"].shape == (2, 2)
    only_a = execute(job("a * b[0]", variables={"a": 1.0, "b": [3.0, 2.0]}, wrt=("a",)))
    assert only_a.gradient == {"a": 3.0}


def test_mixed_hessian_blocks() -> None:
    result = execute(job("a**2 * sum(b**3)", variables={"a": 2.0, "b": [1.0, 2.0]}, derivatives=("hessian",)))
    assert result.hessian is not None
    assert_close(result.hessian["a"]["b"], 2 * 2.0 * 3 * np.array([1.0, 4.0]), CLOSED_FORM, "d2/da db")
    assert_close(result.hessian["b"]["a"], result.hessian["a"]["b"], CLOSED_FORM, "d2/db da = d2/da db")
    assert_close(result.hessian["b"]["b"], np.diag(4.0 * 6 * np.array([1.0, 2.0])), CLOSED_FORM, "d2/db2")


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_order_k_derivatives_of_a_scalar_function(k: int) -> None:
    result = execute(job("exp(2*x) + x**5", variables={"x": 0.7}, order=k))
    assert result.higher is not None and result.higher["order"] == k
    x = 0.7
    closed = [2 * np.exp(2 * x) + 5 * x**4, 4 * np.exp(2 * x) + 20 * x**3,
              8 * np.exp(2 * x) + 60 * x**2, 16 * np.exp(2 * x) + 120 * x]  # fmt: skip
    assert_close(result.higher["derivatives"], closed[:k], DERIVED_CHAIN, f"derivatives of order 1..{k}")


def test_order_derivative_tensor_of_a_vector_variable() -> None:
    x = np.array([0.5, -0.25])
    result = execute(job("sum(x**2) * x[0]", variables={"x": x}, order=3))
    assert result.higher is not None
    third = result.higher["derivatives"][2]
    assert third.shape == (2, 2, 2)
    # f = x0^3 + x0 x1^2: d3/dx0^3 = 6; mixed (0,1,1) and permutations = 2; the rest 0.
    expected = np.zeros((2, 2, 2))
    expected[0, 0, 0] = 6
    for idx in [(0, 1, 1), (1, 0, 1), (1, 1, 0)]:
        expected[idx] = 2
    assert_close(third, expected, CLOSED_FORM, "third derivative tensor")


def test_batch_gives_f_f1_f2_on_a_grid_in_one_call() -> None:
    grid = np.linspace(-3, 3, 1000)
    result = execute(
        job("x * sin(x)", variables={"x": grid}, derivatives=("gradient", "hessian"), batch=True)
    )
    assert result.gradient is not None and result.hessian is not None
    assert_close(result.value, grid * np.sin(grid), CLOSED_FORM, "f")
    assert_close(result.gradient["x"], np.sin(grid) + grid * np.cos(grid), CLOSED_FORM, "f'")
    assert_close(result.hessian["x"]["x"], 2 * np.cos(grid) - grid * np.sin(grid), CLOSED_FORM, "f''")


def test_batch_of_vector_points_with_shared_constants() -> None:
    pts = np.random.default_rng(2).normal(size=(5, 3))
    w = np.array([1.0, -2.0, 0.5])
    j = GradientJob(
        "sum(w * x**2)",
        {"x": pts},
        constants={"w": w},
        derivatives=("gradient", "hessian"),
        batch=True,
        dtype="float64",
    )
    result = execute(j)
    assert result.gradient is not None and result.hessian is not None
    assert_close(result.gradient["x"], 2 * w * pts, CLOSED_FORM, "gradient")
    assert_close(result.hessian["x"]["x"], np.broadcast_to(np.diag(2 * w), (5, 3, 3)), CLOSED_FORM, "hessian")


def test_float32_is_the_default_and_float64_is_honoured() -> None:
    assert execute(GradientJob("x / 3", {"x": np.array(1.0)})).value.dtype == np.float32
    assert execute(job("x / 3", variables={"x": 1.0})).value.dtype == np.float64


def test_second_order_through_a_custom_gradient() -> None:
    functions = {"cube": {"params": ["x"], "body": "x**3", "gradient": {"x": "dy * 3 * x**2"}}}
    result = execute(
        job("cube(x)", variables={"x": 2.0}, functions=functions, derivatives=("gradient", "hessian"))
    )
    assert result.gradient == {"x": 12.0} and result.hessian == {"x": {"x": 12.0}}


def test_custom_gradient_is_the_one_used_and_missing_params_fall_back_to_autodiff() -> None:
    functions = {"f": {"params": ["a", "b"], "body": "a * b", "gradient": {"a": "dy * 100"}}}
    result = execute(job("f(x, y)", variables={"x": 2.0, "y": 5.0}, functions=functions))
    assert result.gradient == {"x": 100.0, "y": 2.0}


def test_clip_gradient_and_stop_gradient() -> None:
    result = execute(job("clip_gradient(x, -1, 1) * 10 + stop_gradient(x) * 5", variables={"x": [1.0, 2.0]}))
    assert result.gradient is not None
    assert_close(result.gradient["x"], [1.0, 1.0], EXACT, "gradient")


def test_comparisons_and_conditionals_are_masks() -> None:
    x = np.array([-1.0, 0.5, 2.0])
    result = execute(job("sum((x > 0) * x**2 + (x if x < 1 and x > -0.5 else 0))", variables={"x": x}))
    assert result.gradient is not None
    assert_close(result.gradient["x"], [0.0, 2.0, 4.0], CLOSED_FORM, "gradient")


def test_broadcast_past_the_element_limit_is_refused_before_it_runs() -> None:
    x = np.zeros(100_000)
    with pytest.raises(LimitExceeded) as info:
        execute(job("sum(x[:, None] * x[None, :])", variables={"x": x}))
    body = info.value.to_dict()
    assert body["limit"] == "max_tensor_elements" and body["column"] == 5
    assert "[100000, 100000]" in body["detail"]


def test_shape_creating_functions_obey_the_limit() -> None:
    for expression in ["sum(eye(100000)) * x", "sum(zeros((10000, 10000))) * x", "sum(arange(1e12)) * x"]:
        with pytest.raises(LimitExceeded):
            execute(job(expression, variables={"x": 1.0}))


def test_derivative_sizes_obey_the_limit() -> None:
    with pytest.raises(LimitExceeded) as info:
        execute(
            job("sum(x**2)", variables={"x": np.zeros(5000)}, derivatives=("hessian",)),
            Limits(max_tensor_elements=1_000_000),
        )
    assert "hessian" in info.value.detail


@pytest.mark.parametrize(
    ("expression", "variables", "error", "text"),
    [
        ("x + y", {"x": [1.0, 2.0], "y": [1.0, 2.0, 3.0]}, ShapeError, "Dimensions must be equal"),
        ("x[5]", {"x": [1.0, 2.0]}, ShapeError, "out of range"),
        ("x[0, 0]", {"x": [1.0, 2.0]}, ShapeError, "too many indices"),
        ("matmul(x, x)", {"x": [[1.0, 2.0, 3.0]]}, ShapeError, ""),
    ],
)
def test_user_errors_are_typed_and_located(
    expression: str, variables: dict[str, Any], error: type[TapeserveError], text: str
) -> None:
    with pytest.raises(error) as info:
        execute(job(expression, variables=variables))
    assert text in info.value.detail
    assert 400 <= info.value.status < 500


def test_values_a_valid_program_cannot_take_are_evaluation_errors() -> None:
    bad_index = job("sum(take(x, i))", variables={"x": [1.0, 2.0]}, constants={"i": np.array([5.0])})
    with pytest.raises(EvaluationError) as info:
        execute(bad_index)
    assert "failed for these values" in info.value.detail and "5" in info.value.detail
    # The same program with good values still runs: the failure did not poison the cache.
    bad_index.constants = {"i": np.array([1.0])}
    assert execute(bad_index).value == 2.0


@pytest.mark.parametrize("derivatives", [("gradient", "hessian"), ("vjp",), ("hvp", "jacobian")])
def test_gradients_through_gather_are_dense(derivatives: tuple[str, ...]) -> None:
    # TF returns IndexedSlices for gather's gradient; once they reached the client as a 500.
    x = np.array([1.0, 2.0, 3.0])
    result = execute(
        job("sum(gather(x, i) ** 2)", variables={"x": x}, constants={"i": np.array([0.0, 2.0, 2.0])},
            derivatives=derivatives, tangents={"x": np.ones(3)}, cotangent=np.array(1.0))
    )  # fmt: skip
    grad = np.array([2.0, 0.0, 12.0])  # d/dx of x0^2 + 2 x2^2
    hess = np.diag([2.0, 0.0, 4.0])
    if result.gradient is not None:
        assert_close(result.gradient["x"], grad, CLOSED_FORM, "gradient")
        assert_close(result.hessian["x"]["x"], hess, CLOSED_FORM, "hessian")  # type: ignore[index]
    if result.vjp is not None:
        assert_close(result.vjp["x"], grad, CLOSED_FORM, "vjp")
    if result.hvp is not None:
        assert_close(result.hvp["x"], hess @ np.ones(3), CLOSED_FORM, "hvp")
        assert_close(result.jacobian["x"], grad, CLOSED_FORM, "jacobian")  # type: ignore[index]


def test_hessian_of_a_vector_expression_is_refused() -> None:
    with pytest.raises(ShapeError) as info:
        execute(job("x * 2", variables={"x": [1.0, 2.0]}, derivatives=("hessian",)))
    assert "scalar" in info.value.detail


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"derivatives": ("hvp",)}, "tangents.x"),
        ({"derivatives": ("vjp",)}, "cotangent"),
        ({"derivatives": ("gradient",), "wrt": ("z",)}, "wrt"),
        ({"order": 9}, "order"),
        ({"derivatives": ("laplacian",)}, "derivatives"),
    ],
)
def test_request_mistakes_name_their_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        execute(job("sum(x)", variables={"x": [1.0]}, **kwargs))
    assert info.value.extra["field"] == field


def test_cotangent_shape_must_match_the_value() -> None:
    with pytest.raises(ShapeError):
        execute(job("x * 2", variables={"x": [1.0, 2.0]}, derivatives=("vjp",), cotangent=np.ones(3)))


def test_non_finite_values_pass_through() -> None:
    result = execute(job("log(x)", variables={"x": [0.0, -1.0, 1.0]}))
    assert result.gradient is not None
    assert np.isneginf(result.value[0]) and np.isnan(result.value[1])
    assert np.isposinf(result.gradient["x"][0])
