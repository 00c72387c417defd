"""The one validation of each job kind (service.jobs), without TensorFlow: what it refuses and how it says so.

The API calls these to refuse a request early and the engine calls them again on the job, so a
refusal reads the same wherever it is raised (tests/engine/test_same_refusals.py runs both sides).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.errors import InvalidRequest, LimitExceeded, ShapeError
from service.jobs import (
    ExpressionStepJob,
    GradientJob,
    TrainStepJob,
    check_expression_step_job,
    check_gradient_job,
    check_gradient_names,
    check_optimizer_state,
    check_steps,
    check_tensors,
    check_train_step_job,
    job_functions,
)
from service.limits import Limits
from service.models.layout import model_layout, optimizer_state_layout, variables_layout

LIMITS = Limits()
SPEC = {"input_shape": [3], "layers": [{"type": "dense", "units": 2}]}
SGD = {"type": "sgd", "learning_rate": 0.1, "momentum": 0.9, "nesterov": False}


def names(**overrides: Any) -> tuple[str, ...]:
    args: dict[str, Any] = {
        "derivatives": ("gradient",),
        "variables": ["x", "y"],
        "constants": ["c"],
        "wrt": None,
        "tangents": None,
        "cotangent": False,
        "order": None,
        "dtype": "float32",
        "limits": LIMITS,
    }
    return check_gradient_names(**(args | overrides))


def refusal(error: type[Exception], call: Any, *args: Any, **kwargs: Any) -> Any:
    with pytest.raises(error) as caught:
        call(*args, **kwargs)
    return caught.value


def test_wrt_defaults_to_every_variable_and_drops_duplicates() -> None:
    assert names() == ("x", "y")
    assert names(wrt=["y", "y"]) == ("y",)


def test_a_constant_in_wrt_is_named_with_a_hint() -> None:
    error = refusal(InvalidRequest, names, wrt=["c"])
    assert (
        error.detail
        == "wrt names 'c', which is not a variable (constants are not differentiated); variables: x, y"
    )
    assert error.extra["field"] == "wrt"


def test_missing_tangents_name_the_field_or_the_missing_entry() -> None:
    absent = refusal(InvalidRequest, names, derivatives=("hvp",))
    assert absent.detail == "hvp need tangents for every wrt variable; missing: x, y"
    assert absent.extra["field"] == "tangents"
    partial = refusal(InvalidRequest, names, derivatives=("jvp",), tangents=["x"])
    assert partial.extra["field"] == "tangents.y"


def test_unused_inputs_are_refused_in_a_request_and_ignored_in_a_job() -> None:
    assert refusal(InvalidRequest, names, tangents=["x"]).extra["field"] == "tangents"
    assert refusal(InvalidRequest, names, cotangent=True).extra["field"] == "cotangent"
    job = GradientJob("sum(x)", {"x": np.ones(2)}, tangents={"x": np.ones(2)}, cotangent=np.ones(()))
    assert check_gradient_job(job, LIMITS) == ("x",)


def test_order_is_bounded_and_needs_one_variable() -> None:
    assert refusal(InvalidRequest, names, order=2).extra["field"] == "order"
    assert refusal(LimitExceeded, names, order=LIMITS.max_order + 1, wrt=["x"]).extra["limit"] == "max_order"


def test_batches_share_their_leading_axis() -> None:
    job = GradientJob("x + y", {"x": np.ones((3, 2)), "y": np.ones(4)}, batch=True)
    error = refusal(ShapeError, check_gradient_job, job, LIMITS)
    assert error.detail == "with batch, every variable has the same leading axis: x has 3, y has 4"
    assert error.extra["field"] == "variables.y"


def test_tensor_lists_say_what_the_model_needs() -> None:
    layout = model_layout(SPEC)
    error = refusal(ShapeError, check_tensors, [np.ones((3, 2))], layout.weights, "weights")
    assert error.detail == (
        "weights has 1 tensors; this model needs 2 (model.layers[0].kernel, model.layers[0].bias)"
    )
    error = refusal(ShapeError, check_tensors, [np.ones((3, 2)), np.ones(3)], layout.weights, "weights")
    assert error.detail == "weights[1] (model.layers[0].bias) has shape [3]; it must be [2]"


@pytest.mark.parametrize("iteration", [-1.0, 0.5, np.inf])
def test_the_iteration_count_is_a_non_negative_integer(iteration: float) -> None:
    expected = optimizer_state_layout(SGD, model_layout(SPEC))
    state = [np.asarray(iteration), np.zeros((3, 2)), np.zeros(2)]
    error = refusal(InvalidRequest, check_optimizer_state, state, expected)
    assert error.detail == "optimizer_state[0] is the iteration count: a non-negative integer"


def test_steps_are_bounded() -> None:
    assert refusal(LimitExceeded, check_steps, LIMITS.max_steps + 1, LIMITS).extra["field"] == "steps"
    assert refusal(InvalidRequest, check_steps, 0, LIMITS).extra["field"] == "steps"


def test_reinforce_actions_are_named_as_the_request_gave_them() -> None:
    layout = model_layout(SPEC)
    job = TrainStepJob(
        SPEC, np.ones((2, 3)), None, None, SGD, None, {"type": "mse"},
        objective={"type": "reinforce"}, actions=np.array([0.0, 5.0]), returns=np.ones(2),
    )  # fmt: skip
    error = refusal(InvalidRequest, check_train_step_job, job, layout, (), LIMITS)
    assert error.detail == "objective.actions[1] is 5; the model has 2 actions (0..1)"


def test_an_expression_steps_state_follows_its_variables() -> None:
    variables = {"x": np.ones(3)}
    expected = optimizer_state_layout(SGD, variables_layout(variables))
    assert [s.name for s in expected] == ["iteration", "variables.x/momentum"]
    job = ExpressionStepJob("sum(x**2)", variables, optimizer=SGD, optimizer_state=[np.zeros(())])
    assert refusal(ShapeError, check_expression_step_job, job, expected, LIMITS).extra["field"] == (
        "optimizer_state"
    )


def test_functions_become_plain_dicts_in_definition_order() -> None:
    class Spec:
        params = ("x",)
        body = "x * 2"
        gradient = None
        doc = "doubles"

    assert job_functions({"f": Spec(), "g": Spec()}) == {
        "f": {"params": ["x"], "body": "x * 2", "gradient": None},
        "g": {"params": ["x"], "body": "x * 2", "gradient": None},
    }
    assert job_functions({"f": Spec()}, doc=True)["f"]["doc"] == "doubles"
