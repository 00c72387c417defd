"""Numpy plans (service/engine/plan.py): the same graph as TensorFlow's, run op by op with numpy.

Every check compares against TensorFlow running the same program: the runner's first call of a
program always goes through TF's runtime, so a program called three times gives TF's answer first
and the plan's last. Also checked directly against TF: the kernels whose semantics are subtle
(strided slices with masks, broadcast gradient axes, matrix products with transposes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, note
from hypothesis import strategies as st

from service.engine import execute, runner
from service.engine import plan as plan_module
from service.engine.plan import UnsupportedGraph, build_plan
from service.jobs import GradientJob, GradientResult
from tests.engine.test_random_expressions import (
    CONSTANTS,
    SETTINGS,
    points,
    scalar_expressions,
    vector_expressions,
)
from tests.tolerances import (
    EXACT,
    PLAN,
    PLAN_FEW_OPS,
    PLAN_FLOAT32,
    PLAN_ONE_KERNEL,
    Tolerance,
    assert_close,
)

RNG = np.random.default_rng(7)
X = np.array([0.3, -0.7, 1.1, 0.45])
Y = np.array([-0.2, 0.9, 0.15, 0.6])
V = np.array([0.5, -1.0, 0.25, 2.0])
A = RNG.normal(size=(4, 4))


@pytest.fixture(autouse=True)
def fresh_programs() -> Iterator[None]:
    """Each test starts from an empty program cache (a plan is decided per cached program)."""
    runner._CACHE.entries.clear()
    yield
    runner._CACHE.entries.clear()


def job(expression: str, derivatives: tuple[str, ...], dtype: str = "float64", **extra: Any) -> GradientJob:
    variables = {"x": X.astype(dtype), "y": Y.astype(dtype)}
    return GradientJob(
        expression=expression,
        variables=extra.pop("variables", variables),
        constants=extra.pop("constants", {"a": A.astype(dtype)}),
        derivatives=derivatives,
        dtype=dtype,
        **extra,
    )


def three_calls(make: Callable[[], GradientJob]) -> tuple[GradientResult, GradientResult]:
    """TF's answer (first call) and the third call's (a plan's, once the second call adopted it)."""
    first = execute(make())
    execute(make())
    third = execute(make())
    assert isinstance(first, GradientResult) and isinstance(third, GradientResult)
    assert first.executor == "tensorflow"
    return first, third


def fields(result: GradientResult) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {"value": np.asarray(result.value)}
    for name in ("gradient", "jacobian", "hvp", "vjp"):
        for var, array in (getattr(result, name) or {}).items():
            out[f"{name}/{var}"] = array
    for a, row in (result.hessian or {}).items():
        for b, array in row.items():
            out[f"hessian/{a}/{b}"] = array
    if result.jvp is not None:
        out["jvp"] = result.jvp
    for i, array in enumerate((result.higher or {}).get("derivatives", [])):
        out[f"order{i + 1}"] = array
    return out


def assert_same(
    reference: GradientResult, result: GradientResult, tolerance: Tolerance = PLAN_FEW_OPS
) -> None:
    """Every field of ``result`` as ``reference``'s: same shape and dtype, and ``tolerance`` scaled to
    the field's largest entry (an entry that cancels to ~0 keeps the rounding of its large terms)."""
    expected, actual = fields(reference), fields(result)
    assert expected.keys() == actual.keys()
    for key, want in expected.items():
        got = actual[key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
        assert_close(got, want, tolerance.scaled(want), key)


ALL_FIRST_AND_SECOND = ("gradient", "hessian", "hvp")
PLANNED = [
    ("sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)", ALL_FIRST_AND_SECOND),
    ("sum(sin(x) * cos(y)) + prod(tanh(x) + 2)", ALL_FIRST_AND_SECOND),
    ("sum(exp(x) / (1 + y**2)) - mean(sqrt(1 + x**2))", ALL_FIRST_AND_SECOND),
    ("sum(log(1 + x**2) + log1p(y**2) + expm1(x / 3))", ALL_FIRST_AND_SECOND),
    ("sum(sigmoid(x) * relu(y) + abs(x - y))", ("gradient", "hessian")),
    ("sum(softplus(40 * x) + softplus(x) + elu(x) * selu(y))", ("gradient", "hessian")),
    ("sum(where(x > 0, x**3, 2 * x) + maximum(x, y) + minimum(x, 0.1))", ("gradient", "hessian")),
    ("x @ a @ x + dot(y, x)", ALL_FIRST_AND_SECOND),
    ("sum(matmul(a, x) ** 2)", ALL_FIRST_AND_SECOND),
    ("sum(reshape(x, (2, 2)) @ transpose(reshape(y, (2, 2))))", ("gradient", "hessian")),
    ("sum(concatenate([x[::-1], y[1:3]]) ** 2) + sum(stack([x, y]) * 2)", ("gradient", "hessian")),
    ("sum(arctan(x) + arcsinh(y) + cosh(x / 2) + tan(y / 2))", ("gradient", "hessian")),
    ("sum(abs(x) ** 2.5) + sum(abs(y) ** x)", ("gradient",)),
    ("sum(x / (1 + y ** 2)) + sum(x) / 4", ("gradient", "hessian")),
    ("sum(take(x, [2, 0, 3, 2]) ** 3) + x[1] * y[3]", ALL_FIRST_AND_SECOND),
]


@pytest.mark.parametrize(("expression", "derivatives"), PLANNED, ids=[e for e, _ in PLANNED])
def test_plans_reproduce_tensorflow(expression: str, derivatives: tuple[str, ...]) -> None:
    tangents = {"x": V, "y": V[::-1].copy()} if "hvp" in derivatives else {}
    first, third = three_calls(lambda: job(expression, derivatives, tangents=tangents))
    assert third.executor == "numpy"
    assert_same(first, third)


@pytest.mark.parametrize(("expression", "derivatives"), PLANNED[:3], ids=[e for e, _ in PLANNED[:3]])
def test_plans_run_only_the_steps_an_output_needs(expression: str, derivatives: tuple[str, ...]) -> None:
    """pfor leaves the loop body's own backward pass in a Hessian's graph beside the vectorized one
    (14 of rosen's 52 steps): TF's executor never runs it, and neither does the plan."""
    tangents = {"x": V, "y": V[::-1].copy()} if "hvp" in derivatives else {}
    three_calls(lambda: job(expression, derivatives, tangents=tangents))
    (program,) = [entry for entry in runner._CACHE.entries.values() if entry.plan is not None]
    plan = program.plan
    assert plan is not None
    needed = set(plan.outputs)
    for _, args, out in reversed(plan.steps):
        assert out in needed, f"step writing register {out} feeds no output"
        needed.update(args)


def test_vector_expressions_jacobian_jvp_vjp_and_higher_orders() -> None:
    tangents = {"x": V, "y": V[::-1].copy()}
    first, third = three_calls(
        lambda: job("sin(x) * y + a @ x", ("jacobian", "jvp", "vjp"), tangents=tangents, cotangent=V)
    )
    assert third.executor == "numpy"
    assert_same(first, third)

    first, third = three_calls(lambda: job("sum(exp(x) * x**2)", (), wrt=["x"], order=3))
    assert third.executor == "numpy"
    assert_same(first, third)


def test_float32_programs_stay_float32() -> None:
    first, third = three_calls(lambda: job("sum(tanh(x) * y**2)", ("gradient", "hessian"), dtype="float32"))
    assert third.executor == "numpy"
    assert third.gradient is not None and third.gradient["x"].dtype == np.float32
    assert_same(first, third, PLAN_FLOAT32)


@pytest.mark.parametrize("expression", ["sum(erf(x))", "sum(lgamma(x + 3))", "det(a + 4 * eye(4)) * sum(x)"])
def test_graphs_with_ops_outside_the_plan_stay_on_tensorflow(expression: str) -> None:
    first, third = three_calls(lambda: job(expression, ("gradient",)))
    assert third.executor == "tensorflow"
    assert_same(first, third, EXACT)


def test_non_finite_answers_come_from_tensorflow() -> None:
    """A plan whose outputs are not all finite is not trusted: TF's NaN and inf conventions answer."""
    expression = "sum(log(x) + sqrt(y))"
    positive = {"x": np.abs(X) + 0.1, "y": np.abs(Y) + 0.1}
    _, third = three_calls(lambda: job(expression, ("gradient",), variables=positive))
    assert third.executor == "numpy"
    bad = execute(job(expression, ("gradient",), variables={"x": -np.abs(X), "y": np.abs(Y)}))
    assert isinstance(bad, GradientResult)
    assert bad.executor == "tensorflow"
    assert np.isnan(bad.value)
    again = execute(job(expression, ("gradient",), variables=positive))
    assert isinstance(again, GradientResult) and again.executor == "numpy"


def test_a_plan_that_disagrees_with_tensorflow_is_not_adopted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(plan_module._FACTORIES, "Square", lambda node, consts: lambda x: 3 * x)
    first, third = three_calls(lambda: job("sum(x**2 + y)", ("gradient",)))
    assert third.executor == "tensorflow"
    assert_same(first, third, EXACT)


def test_plans_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "PLANS_ENABLED", False)
    _, third = three_calls(lambda: job("sum(x**2 + y)", ("gradient",)))
    assert third.executor == "tensorflow"


def test_large_programs_stay_on_tensorflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "PLAN_MAX_ELEMENTS", 7)  # x and y have 8 elements together
    _, third = three_calls(lambda: job("sum(x**2 + y)", ("gradient",)))
    assert third.executor == "tensorflow"


def test_batched_points_use_a_plan_too() -> None:
    grid = np.linspace(-1.0, 1.0, 50)
    first, third = three_calls(
        lambda: job("sin(x) * x**2", ("gradient", "hessian"), variables={"x": grid}, constants={}, batch=True)
    )
    assert_same(first, third)


def random_case(expression: str, derivatives: tuple[str, ...], **extra: Any) -> None:
    """TF's answer and the plan's agree for a generated expression of the random-expression strategy."""
    note(f"expression: {expression}")
    runner._CACHE.entries.clear()
    first, third = three_calls(
        lambda: GradientJob(
            expression=expression, constants=CONSTANTS, derivatives=derivatives, dtype="float64", **extra
        )
    )
    assert third.executor == "numpy"  # every operation of the strategy has a numpy kernel
    assert_same(first, third, PLAN)


@SETTINGS
@given(expression=scalar_expressions(), x=points(3), y=points(3), vx=points(3), vy=points(3))
def test_random_scalar_expressions(
    expression: str, x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray
) -> None:
    random_case(
        expression, ("gradient", "hessian", "hvp"), variables={"x": x, "y": y}, tangents={"x": vx, "y": vy}
    )


@SETTINGS
@given(expression=vector_expressions(), x=points(3), y=points(3), u=points(3))
def test_random_vector_expressions(expression: str, x: np.ndarray, y: np.ndarray, u: np.ndarray) -> None:
    random_case(expression, ("jacobian", "vjp"), variables={"x": x, "y": y}, cotangent=u)


# -- kernels against TensorFlow directly ---------------------------------------------------------


def plan_of(fn: Callable[..., Any], *specs: tf.TensorSpec) -> Callable[..., list[np.ndarray]]:
    graph = tf.function(fn, input_signature=list(specs), autograph=False).get_concrete_function().graph
    plan = build_plan(graph, graph.inputs, graph.outputs)
    return lambda *arrays: plan(list(arrays))


SLICES: list[Callable[[Any], Any]] = [
    lambda t: t[1:, ::2],
    lambda t: t[::-1, -1],
    lambda t: t[..., 1],
    lambda t: t[None, 2:0:-1, :],
    lambda t: t[-2:, tf.newaxis, 1:3],
    lambda t: t[0],
    lambda t: t[:, :, None][1:3],
]


@pytest.mark.parametrize("index", range(len(SLICES)))
def test_strided_slices_and_their_gradients(index: int) -> None:
    spec = tf.TensorSpec([4, 5], tf.float64)

    def fn(t: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = SLICES[index](t)
            loss = tf.reduce_sum(tf.sin(y) * y)
        return y, tape.gradient(loss, t)

    t = RNG.normal(size=(4, 5))
    expected = [v.numpy() for v in tf.function(fn, input_signature=[spec], autograph=False)(t)]
    for i, (got, want) in enumerate(zip(plan_of(fn, spec)(t), expected, strict=True)):
        assert_close(got, want, EXACT, f"output {i}")


@given(
    st.lists(st.sampled_from([1, 2, 3]), min_size=0, max_size=3),
    st.lists(st.sampled_from([1, 2, 3]), min_size=0, max_size=3),
)
@SETTINGS
def test_broadcast_gradient_axes_match_tensorflow(a: list[int], b: list[int]) -> None:
    try:
        np.broadcast_shapes(tuple(a), tuple(b))
    except ValueError:
        return
    want = [v.numpy().tolist() for v in tf.raw_ops.BroadcastGradientArgs(s0=a, s1=b)]
    got = [v.tolist() for v in plan_module._broadcast_gradient_args(np.array(a), np.array(b))]
    assert got == want


def test_matrix_products_with_transposes() -> None:
    specs = (tf.TensorSpec([3, 4], tf.float64), tf.TensorSpec([2, 4, 3], tf.float64))

    def fn(m: Any, b: Any) -> Any:
        return (
            tf.linalg.matmul(m, m, transpose_b=True),
            tf.linalg.matmul(m, m, transpose_a=True),
            tf.linalg.matmul(b, b, adjoint_a=True),
            tf.linalg.matmul(b, b, adjoint_b=True),
            tf.reduce_max(b, axis=[0, 2], keepdims=True),
            tf.reduce_mean(b, axis=-1),
        )

    m, b = RNG.normal(size=(3, 4)), RNG.normal(size=(2, 4, 3))
    expected = [v.numpy() for v in tf.function(fn, input_signature=list(specs), autograph=False)(m, b)]
    for i, (got, want) in enumerate(zip(plan_of(fn, *specs)(m, b), expected, strict=True)):
        assert_close(got, want, PLAN_ONE_KERNEL, f"output {i}")


def test_unknown_ops_and_dynamic_shapes_are_refused() -> None:
    with pytest.raises(UnsupportedGraph, match="Erf"):
        plan_of(tf.math.erf, tf.TensorSpec([3], tf.float64))
    with pytest.raises(UnsupportedGraph, match="not static"):
        plan_of(lambda t: tf.ones(tf.shape(t), t.dtype) * t, tf.TensorSpec([None], tf.float64))


def test_outputs_are_fresh_arrays_even_when_the_graph_folds_them_to_constants() -> None:
    """The Hessian of a quadratic is a constant of the plan: a caller changing it must not change the plan."""
    first, third = three_calls(lambda: job("sum(x**2) + x @ a @ y", ("gradient", "hessian")))
    assert third.executor == "numpy" and third.hessian is not None
    third.hessian["x"]["x"][:] = 123.0
    fourth = execute(job("sum(x**2) + x @ a @ y", ("gradient", "hessian")))
    assert isinstance(fourth, GradientResult) and fourth.executor == "numpy"
    assert_same(first, fourth)


@pytest.mark.parametrize(("axis", "batch_dims"), [(0, 0), (1, 1), (2, 1), (-1, 1), (2, 2)])
def test_gathers_with_batch_dimensions_match_tensorflow(axis: int, batch_dims: int) -> None:
    spec = tf.TensorSpec([2, 3, 4], tf.float64)
    indices = np.array([[[1, 0], [2, 1], [0, 1]], [[1, 1], [0, 0], [1, 0]]], np.int32)  # all < 2

    def fn(t: Any) -> Any:
        picked = tf.constant(indices if batch_dims else indices[0, 0])
        return tf.gather(t, picked, axis=axis, batch_dims=batch_dims)

    t = RNG.normal(size=(2, 3, 4))
    want = tf.function(fn, input_signature=[spec], autograph=False)(t).numpy()
    assert_close(plan_of(fn, spec)(t)[0], want, EXACT, "gather")
