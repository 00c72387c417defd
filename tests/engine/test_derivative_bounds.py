"""Derivatives that vectorize over rows are bounded from static shapes before they are traced.

A Jacobian, a Hessian block or a level of an order-k derivative runs one vector-Jacobian product per
row under ``tf.vectorized_map``: every tensor of the differentiated program gets a leading axis of
``rows``, and the seed is a ``rows x rows`` identity. Each case sits just below and just above its
bound (a small ``max_tensor_elements`` keeps the passing side cheap); the passing side is checked
against a closed form.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.engine import execute
from service.errors import LimitExceeded
from service.jobs import GradientJob, GradientResult
from service.limits import Limits
from tests.tolerances import CLOSED_FORM, assert_close

LIMITS = Limits(max_tensor_elements=100_000)


def run(expression: str, x: np.ndarray, **extra: Any) -> GradientResult:
    job = GradientJob(expression=expression, variables={"x": x}, dtype="float64", **extra)
    result = execute(job, LIMITS)
    assert isinstance(result, GradientResult)
    return result


def refused(expression: str, x: np.ndarray, **extra: Any) -> LimitExceeded:
    with pytest.raises(LimitExceeded) as caught:
        run(expression, x, **extra)
    error = caught.value
    assert error.status == 422 and error.code == "limit_exceeded"
    assert error.extra["limit"] == "max_tensor_elements" and error.extra["allowed"] == 100_000
    assert error.extra["estimate"] > 100_000
    assert str(error.extra["estimate"]) in error.detail and "100000" in error.detail
    return error


# sum over the outer product: its n x n tensor times n Hessian rows is n**3 elements.
OUTER = "sum(x[:, None] * x[None, :])"


def test_hessian_rows_times_the_largest_intermediate() -> None:
    x = np.linspace(-1.0, 1.0, 46)  # 46**3 = 97,336
    result = run(OUTER, x, derivatives=("gradient", "hessian"))
    assert_close(result.hessian["x"]["x"], np.full((46, 46), 2.0), CLOSED_FORM)
    error = refused(OUTER, np.linspace(-1.0, 1.0, 47), derivatives=("hessian",))  # 103,823
    assert error.extra["derivative"].startswith("hessian block x, x")
    assert error.extra["estimate"] == 47**3


def test_the_jacobian_identity_seed_is_counted() -> None:
    # d(x * ones(m)) / dx for a scalar x: m rows, so an m x m identity seeds them.
    result = run("x * ones([316])", np.float64(2.0), derivatives=("jacobian",))
    assert_close(result.jacobian["x"], np.ones(316), CLOSED_FORM)  # 316**2 = 99,856
    error = refused("x * ones([317])", np.float64(2.0), derivatives=("jacobian",))
    assert "identity" in error.extra["derivative"] and error.extra["estimate"] == 317**2


def test_each_order_k_level_vectorizes_the_level_before() -> None:
    # order 3 of sum(x**4): level 2 has n rows over n-element tensors, level 3 n**2 rows over those.
    x = np.linspace(0.5, 1.5, 17)  # 17**4 = 83,521 (the old check saw only 17**3)
    result = run("sum(x**4)", x, order=3)
    assert result.higher is not None
    assert_close(result.higher["derivatives"][2], _third(x), CLOSED_FORM)
    error = refused("sum(x**4)", np.linspace(0.5, 1.5, 18), order=3)  # 18**4 = 104,976
    assert error.extra["derivative"].startswith("order-3 derivative")


def _third(x: np.ndarray) -> np.ndarray:
    """d3/dx3 of sum(x**4): 24 x_i on the diagonal i = j = k, zero elsewhere."""
    n = len(x)
    t = np.zeros((n, n, n))
    t[np.arange(n), np.arange(n), np.arange(n)] = 24 * x
    return t


def test_an_empty_batch_does_not_cancel_the_per_point_size() -> None:
    # 400-element points: the outer product alone is 160,000 elements per point. Zero points used
    # to multiply every check by 0; they count as one.
    error = refused(OUTER, np.zeros((0, 400)), derivatives=("gradient",), batch=True)
    assert error.extra["limit"] == "max_tensor_elements"
    run(OUTER, np.zeros((0, 100)), derivatives=("gradient",), batch=True)  # 10,000 per point: fine
