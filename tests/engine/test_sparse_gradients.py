"""Gathers make TensorFlow answer with IndexedSlices; every gradient tapeserve returns or reuses is dense.

An Embedding layer's gradient, the HVP taken through it, and an expression step over ``take`` are
checked against float64 central differences and closed forms.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.api.model_schemas import ModelSpec
from service.engine import execute
from service.jobs import (
    ExpressionStepJob,
    ExpressionStepResult,
    ModelGradientJob,
    ModelGradientResult,
)
from tests.tolerances import CLOSED_FORM, FINITE_DIFFERENCE, assert_close

RAW_SPEC: dict[str, Any] = {
    "input_shape": [2],
    "seed": 3,
    "layers": [
        {"type": "embedding", "input_dim": 5, "output_dim": 2},
        {"type": "flatten"},
        {"type": "dense", "units": 3, "activation": "tanh"},
        {"type": "dense", "units": 1},
    ],
}
SPEC = ModelSpec.model_validate(RAW_SPEC).model_dump()
MSE = {"type": "mse", "from_logits": False, "delta": 1.0}
# Token 0 twice in one example and token 2 in two: the sparse gradient has duplicate rows to sum.
X = np.array([[1, 4], [0, 0], [2, 2]], np.float64)
Y = np.array([[0.5], [-1.0], [0.25]])
RNG = np.random.default_rng(5)
WEIGHTS = [RNG.normal(scale=0.7, size=s) for s in [(5, 2), (4, 3), (3,), (3, 1), (1,)]]
TANGENTS = [RNG.normal(size=w.shape) for w in WEIGHTS]


def gradient(weights: list[np.ndarray], tangents: list[np.ndarray] | None = None) -> ModelGradientResult:
    job = ModelGradientJob(SPEC, X, Y, weights, MSE, tangents=tangents, dtype="float64")
    result = execute(job)
    assert isinstance(result, ModelGradientResult) and result.weight_gradients is not None
    return result


def test_the_embedding_gradient_is_dense_with_zero_rows_for_unused_tokens() -> None:
    result = gradient(WEIGHTS)
    assert result.weight_gradients is not None
    table = result.weight_gradients[0]
    assert isinstance(table, np.ndarray) and table.shape == (5, 2)
    assert np.all(table[3] == 0.0)  # token 3 appears nowhere
    assert np.any(table[0] != 0.0) and np.any(table[2] != 0.0)


def test_hvp_through_an_embedding_equals_central_differences_of_the_gradient() -> None:
    result = gradient(WEIGHTS, TANGENTS)
    assert result.hvp is not None and result.weight_gradients is not None
    eps = 1e-5

    def moved(sign: float) -> list[np.ndarray]:
        shifted = [w + sign * eps * t for w, t in zip(WEIGHTS, TANGENTS, strict=True)]
        grads = gradient(shifted).weight_gradients
        assert grads is not None
        return grads

    plus, minus = moved(1.0), moved(-1.0)
    for i, (hv, a, b) in enumerate(zip(result.hvp, plus, minus, strict=True)):
        assert isinstance(hv, np.ndarray) and hv.shape == WEIGHTS[i].shape
        reference = (a - b) / (2 * eps)
        assert_close(hv, reference, FINITE_DIFFERENCE.scaled(reference), f"hvp[{i}]")


def test_an_expression_step_over_take_moves_each_element_by_its_own_gradient() -> None:
    # f = sum(take(x, [0, 0, 2])**2) = 2 x0^2 + x2^2: gradient (4 x0, 0, 2 x2), x1 untouched.
    x = np.array([1.0, -2.0, 3.0])
    lr = 0.125  # exact in float32, the dtype Keras keeps a learning rate in
    job = ExpressionStepJob(
        "sum(take(x, [0, 0, 2])**2)",
        {"x": x},
        optimizer={"type": "sgd", "learning_rate": lr, "momentum": 0.0, "nesterov": False},
        dtype="float64",
    )
    result = execute(job)
    assert isinstance(result, ExpressionStepResult)
    assert_close(result.variables["x"], x - lr * np.array([4 * x[0], 0.0, 2 * x[2]]), CLOSED_FORM)
    assert_close(result.history[0].loss, 2 * x[0] ** 2 + x[2] ** 2, CLOSED_FORM)
