"""One wording: a job the API would refuse is refused by the engine with the same problem.

The API builds the job from a request and refuses it early; the engine checks the job again
(defence in depth) with the same function from service.jobs. Here the same mistake goes both ways,
as a request (the API's builder) and as a job (``execute``, as a worker runs it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from service.api.gradient_job import build_gradient_job
from service.api.model_job import build_expression_step_job, build_train_step_job
from service.api.model_schemas import ExpressionStepRequest, TrainStepRequest
from service.api.schemas import GradientRequest
from service.engine import execute
from service.errors import TapeserveError
from service.limits import Limits

LIMITS = Limits(max_steps=5)
MODEL = {"input_shape": [3], "layers": [{"type": "dense", "units": 2}]}
X = np.ones((4, 3)).tolist()
Y = np.zeros((4, 2)).tolist()
STATE = [0.0, np.zeros((3, 2)).tolist(), np.zeros(2).tolist()]  # sgd with momentum: iteration, 2 slots


def train_step(**fields: Any) -> dict[str, Any]:
    body = {"model": MODEL, "x": X, "y": Y, "loss": "mse", "optimizer": {"type": "sgd", "momentum": 0.9}}
    return body | fields


def expression_step(**fields: Any) -> dict[str, Any]:
    body = {"expression": "sum(x**2)", "variables": {"x": [1.0, 2.0]}, "optimizer": {"type": "adam"}}
    return body | fields


def both_refuse(build: Callable[[Any, Limits], Any], good: Any, bad: Any, **job_changes: Any) -> None:
    """The API refuses ``bad``; the job of ``good`` with ``job_changes`` is refused alike by the engine."""
    with pytest.raises(TapeserveError) as api:
        build(bad, LIMITS)
    job = dataclasses.replace(build(good, LIMITS), **job_changes)
    with pytest.raises(TapeserveError) as engine:
        execute(job, LIMITS)
    assert engine.value.to_dict() == api.value.to_dict()


def test_the_iteration_count() -> None:
    bad = [-1.0, *STATE[1:]]
    both_refuse(
        build_train_step_job,
        TrainStepRequest.model_validate(train_step(optimizer_state=STATE)),
        TrainStepRequest.model_validate(train_step(optimizer_state=bad)),
        optimizer_state=[np.asarray(-1.0, np.float32), *(np.asarray(s, np.float32) for s in STATE[1:])],
    )


def test_a_weight_of_the_wrong_shape() -> None:
    weights = [np.zeros((3, 2)).tolist(), np.zeros(2).tolist()]
    both_refuse(
        build_train_step_job,
        TrainStepRequest.model_validate(train_step(weights=weights)),
        TrainStepRequest.model_validate(train_step(weights=[weights[0], [0.0] * 3])),
        weights=[np.zeros((3, 2), np.float32), np.zeros(3, np.float32)],
    )


def test_too_many_steps() -> None:
    both_refuse(
        build_train_step_job,
        TrainStepRequest.model_validate(train_step()),
        TrainStepRequest.model_validate(train_step(steps=6)),
        steps=6,
    )


def test_an_expression_steps_optimizer_state() -> None:
    both_refuse(
        build_expression_step_job,
        ExpressionStepRequest.model_validate(expression_step()),
        ExpressionStepRequest.model_validate(expression_step(optimizer_state=[0.0])),
        optimizer_state=[np.zeros((), np.float32)],
    )


def gradient(**fields: Any) -> GradientRequest:
    body = {"expression": "sum(x * c)", "variables": {"x": [1.0, 2.0]}, "constants": {"c": 2.0}}
    return GradientRequest.model_validate(body | fields)


def test_a_constant_in_wrt() -> None:
    both_refuse(build_gradient_job, gradient(), gradient(wrt=["c"]), wrt=("c",))


def test_missing_tangents() -> None:
    tangents = {"x": [1.0, 1.0]}
    both_refuse(
        build_gradient_job,
        gradient(derivatives=["hvp"], tangents=tangents),
        gradient(derivatives=["hvp"], tangents={"y": [1.0]}, variables={"x": [1.0, 2.0], "y": [1.0]}),
        tangents={"y": np.ones(1, np.float32)},
        variables={"x": np.ones(2, np.float32), "y": np.ones(1, np.float32)},
    )


def test_batches_of_different_sizes() -> None:
    variables = {"x": [[1.0], [2.0]], "y": [1.0, 2.0, 3.0]}
    both_refuse(
        build_gradient_job,
        gradient(expression="sum(x)", variables={"x": [[1.0], [2.0]]}, constants={}, batch=True),
        gradient(expression="sum(x) + y", variables=variables, constants={}, batch=True),
        expression="sum(x) + y",
        variables={"x": np.ones((2, 1), np.float32), "y": np.ones(3, np.float32)},
    )
