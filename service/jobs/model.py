"""Model gradient, train-step and expression-step jobs and results; their one validation.

The checks need the model's weight layout, which ``service.models.layout`` computes from the spec:
the caller passes it in (anything shaped like ``ModelShape``), so this module stays below models.
The API calls them to refuse a request early, the engine again before it builds or feeds a program.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.errors import InvalidRequest, LimitExceeded, NotDifferentiable, ShapeError
from service.jobs.counts import counts_signature, loop_counts
from service.jobs.hyperparameters import (
    clip_kind,
    clip_values,
    model_structure,
    optimizer_structure,
    optimizer_values,
    regularizer_values,
)
from service.jobs.packing import packed
from service.limits import Limits

__all__ = [
    "ExpressionStepJob",
    "ExpressionStepResult",
    "ModelGradientJob",
    "ModelGradientResult",
    "ModelShape",
    "StepRecord",
    "TensorShape",
    "TrainStepJob",
    "TrainStepResult",
    "check_expression_step_job",
    "check_input_count",
    "check_model_gradient_job",
    "check_optimizer_state",
    "check_steps",
    "check_tensors",
    "check_train_step_job",
]


def _plain(value: Any) -> str:
    """A stable text form of plain spec data (dicts keep insertion order, which the API fixes)."""
    return repr(value)


def _hyperparameters(values: list[float]) -> np.ndarray:
    """The float64 vector of a compiled program's hyper-parameters (service/jobs/hyperparameters.py)."""
    return np.array(values, np.float64)


@packed("x", "y", "weights", "tangents")
@dataclass(slots=True)
class ModelGradientJob:
    """Loss, gradients (weights and/or inputs), HVP, saliency or adversarial inputs of a model spec."""

    model: dict[str, Any]  # the spec as plain data, every default filled in
    x: np.ndarray
    y: np.ndarray | None
    weights: list[np.ndarray] | None  # Keras get_weights() order; None: initialized from the spec's seed
    loss: dict[str, Any]  # {"type": ..., "from_logits": ..., "delta": ...}
    wrt: tuple[str, ...] = ("weights",)  # any of "weights", "inputs"
    tangents: list[np.ndarray] | None = None  # HVP w.r.t. weights, one per weight
    saliency: bool = False
    adversarial: dict[str, Any] | None = None  # {"method", "epsilon", "steps", "step_size", "clip_min", ...}
    training: bool = False
    dtype: str = "float32"

    def signature(self) -> str:
        """What the compiled model program depends on (batch size excluded: traced with a free batch axis).

        Regularization strengths are not part of it: they are ``hyperparameters()``, fed on every call.
        """
        return "|".join(
            [
                "model-gradient",
                _plain(model_structure(self.model)),
                str(list(self.x.shape[1:])),
                "-" if self.y is None else str(list(self.y.shape[1:])),
                _plain(self.loss),
                ",".join(self.wrt),
                str(self.tangents is not None),
                str(self.saliency),
                "adversarial" if self.adversarial is not None else "-",
                str(self.training),
                self.dtype,
            ]
        )

    def hyperparameters(self) -> np.ndarray:
        """The run-time inputs of the compiled program: every regularizer's l1 and l2."""
        return _hyperparameters(regularizer_values(self.model))


@packed("weights", "weight_gradients", "input_gradients", "saliency", "hvp", "x_adv")
@dataclass(slots=True)
class ModelGradientResult:
    loss: float
    data_loss: float
    regularization_loss: float
    weights: list[np.ndarray] | None = None  # when the request gave none: the seeded initial weights
    weight_gradients: list[np.ndarray] | None = None
    input_gradients: np.ndarray | None = None
    saliency: np.ndarray | None = None
    hvp: list[np.ndarray] | None = None
    x_adv: np.ndarray | None = None
    adversarial_loss: float | None = None
    cache: str = "miss"
    compute_ms: float = 0.0


@packed("x", "y", "weights", "optimizer_state", "actions", "returns")
@dataclass(slots=True)
class TrainStepJob:
    """k clipped optimizer steps of a model spec on one batch, from given weights and optimizer state."""

    model: dict[str, Any]
    x: np.ndarray
    y: np.ndarray | None
    weights: list[np.ndarray] | None
    optimizer: dict[str, Any]  # {"type": ..., hyper-parameters}, every default filled in
    optimizer_state: list[np.ndarray] | None  # None: a fresh optimizer
    loss: dict[str, Any]
    clip: dict[str, float] | None = None  # {"value": c} | {"norm": c} | {"global_norm": c}
    objective: dict[str, Any] = field(default_factory=lambda: {"type": "supervised"})
    actions: np.ndarray | None = None  # reinforce
    returns: np.ndarray | None = None  # reinforce
    steps: int = 1
    return_gradients: bool = False
    dtype: str = "float32"

    def signature(self) -> str:
        """What the compiled step depends on: spec, per-example shapes, optimizer, clip, objective, loss.

        Only their structure: the optimizer's type and boolean options, the clip kind, which
        regularizers exist. Learning rate, momentum, betas, epsilon, rho, weight decay, the clip
        threshold and L1/L2 strengths are ``hyperparameters()``, inputs of the compiled step.
        """
        return "|".join(
            [
                "train-step",
                _plain(model_structure(self.model)),
                str(list(self.x.shape[1:])),
                "-" if self.y is None else str(list(self.y.shape[1:])),
                _plain(optimizer_structure(self.optimizer)),
                str(clip_kind(self.clip)),
                _plain(self.objective),
                _plain(self.loss),
                self.dtype,
            ]
        )

    def hyperparameters(self) -> np.ndarray:
        """The run-time inputs of the compiled step: optimizer, clip threshold, regularization strengths."""
        return _hyperparameters(
            optimizer_values(self.optimizer) + clip_values(self.clip) + regularizer_values(self.model)
        )


@dataclass(slots=True)
class StepRecord:
    """One optimizer step: the loss before it and the gradient norms it used."""

    loss: float
    data_loss: float
    regularization_loss: float
    gradient_norm: float
    clipped_gradient_norm: float


@packed("weights", "optimizer_state", "gradients")
@dataclass(slots=True)
class TrainStepResult:
    history: list[StepRecord]  # one per step; the last one is the response's top level
    weights: list[np.ndarray]
    optimizer_state: list[np.ndarray]
    gradients: list[np.ndarray] | None = None  # of the last step, before clipping
    cache: str = "miss"
    compute_ms: float = 0.0


@packed("variables", "constants", "optimizer_state")
@dataclass(slots=True)
class ExpressionStepJob:
    """k clipped optimizer steps minimizing a scalar expression over its variables."""

    expression: str
    variables: dict[str, np.ndarray]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    functions: dict[str, dict[str, Any]] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=lambda: {"type": "sgd"})
    optimizer_state: list[np.ndarray] | None = None
    clip: dict[str, float] | None = None
    steps: int = 1
    dtype: str = "float32"
    # constants used as loop step counts (fori(n, ...)): their values are part of the program
    counts: tuple[str, ...] = ()

    def signature(self) -> str:
        return "|".join(
            [
                "expression-step",
                self.expression,
                _plain(list(self.functions.items())),
                ",".join(f"{k}{list(v.shape)}" for k, v in self.variables.items()),
                ",".join(f"{k}{list(v.shape)}" for k, v in self.constants.items()),
                _plain(optimizer_structure(self.optimizer)),
                str(clip_kind(self.clip)),
                self.dtype,
                counts_signature(self.constants, self.counts),
            ]
        )

    def hyperparameters(self) -> np.ndarray:
        """The run-time inputs of the compiled step: the optimizer's floats, then the clip threshold."""
        return _hyperparameters(optimizer_values(self.optimizer) + clip_values(self.clip))


@packed("variables", "optimizer_state")
@dataclass(slots=True)
class ExpressionStepResult:
    history: list[StepRecord]  # loss = the expression's value before each step
    variables: dict[str, np.ndarray]
    optimizer_state: list[np.ndarray]
    cache: str = "miss"
    compute_ms: float = 0.0


# --- the one validation of each job kind


class TensorShape(Protocol):
    """One expected tensor of a list: models.layout's WeightInfo and StateInfo are ones."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


class ModelShape(Protocol):
    """What the checks need of a model's layout (``service.models.layout.ModelLayout``)."""

    @property
    def weights(self) -> Sequence[TensorShape]: ...

    @property
    def output_shape(self) -> tuple[int, ...]: ...

    @property
    def largest_activation(self) -> int: ...

    @property
    def integer_inputs(self) -> bool: ...


def check_steps(steps: int, limits: Limits) -> None:
    if steps > limits.max_steps:
        raise LimitExceeded(
            f"steps is {steps}; at most {limits.max_steps} are allowed per request",
            limit="max_steps",
            allowed=limits.max_steps,
            field="steps",
        )
    if steps < 1:
        raise InvalidRequest(f"steps must be at least 1, not {steps}", field="steps")


def check_input_count(count: int, limits: Limits) -> None:
    """Variables and constants of an expression step together."""
    if count > limits.max_inputs:
        raise LimitExceeded(
            f"{count} inputs; at most {limits.max_inputs} are allowed",
            limit="max_inputs",
            allowed=limits.max_inputs,
        )


def check_tensors(arrays: Sequence[np.ndarray], expected: Sequence[TensorShape], name: str) -> None:
    """A list of tensors (weights, tangents, optimizer state) against the layout it must have."""
    if len(arrays) != len(expected):
        listing = ", ".join(e.name for e in expected)
        raise ShapeError(
            f"{name} has {len(arrays)} tensors; this model needs {len(expected)} ({listing or 'none'})",
            field=name,
        )
    for i, (array, like) in enumerate(zip(arrays, expected, strict=True)):
        if tuple(array.shape) != tuple(like.shape):
            raise ShapeError(
                f"{name}[{i}] ({like.name}) has shape {list(array.shape)}; it must be {list(like.shape)}",
                field=f"{name}[{i}]",
            )


def check_optimizer_state(state: Sequence[np.ndarray] | None, expected: Sequence[TensorShape]) -> None:
    """The state's tensors (``optimizer_state_layout``'s order) and its first, the iteration count."""
    if state is None:
        return
    check_tensors(state, expected, "optimizer_state")
    it = state[0]
    if not np.isfinite(it) or it < 0 or it != np.round(it):
        raise InvalidRequest(
            "optimizer_state[0] is the iteration count: a non-negative integer", field="optimizer_state[0]"
        )


def _check_model_inputs(
    job: ModelGradientJob | TrainStepJob, layout: ModelShape, limits: Limits, needs_y: bool
) -> None:
    x = job.x
    want = tuple(job.model["input_shape"])
    if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
        raise ShapeError(
            f"x has shape {list(x.shape)}; it must be [batch, {', '.join(map(str, want))}] "
            f"(model.input_shape {list(want)} with a leading batch axis)",
            field="x",
        )
    n = x.shape[0]
    if n < 1:
        raise ShapeError("x holds no examples (its batch axis is 0)", field="x")
    if n > limits.max_batch:
        raise LimitExceeded(
            f"x has {n} examples; at most {limits.max_batch} are allowed",
            limit="max_batch",
            allowed=limits.max_batch,
            field="x",
        )
    activations = n * layout.largest_activation
    if activations > limits.max_tensor_elements:
        raise LimitExceeded(
            f"a layer output would have {activations} elements for {n} examples; "
            f"at most {limits.max_tensor_elements} are allowed",
            limit="max_tensor_elements",
            allowed=limits.max_tensor_elements,
            field="x",
        )
    if layout.integer_inputs:
        vocabulary = job.model["layers"][0]["input_dim"]
        if not np.all(np.isfinite(x)) or np.any(x != np.round(x)) or x.min() < 0 or x.max() >= vocabulary:
            raise InvalidRequest(
                f"x holds token ids for the embedding: integers in [0, {vocabulary})", field="x"
            )
    if job.y is not None:
        _check_y(job.y, n, layout, job.loss["type"])
    elif needs_y:
        raise InvalidRequest("y (the targets) is required for this loss and objective", field="y")
    if job.weights is not None:
        check_tensors(job.weights, layout.weights, "weights")


def _check_y(y: np.ndarray, n: int, layout: ModelShape, loss: str) -> None:
    out = layout.output_shape
    if loss == "sparse_categorical_crossentropy":
        want = (n, *out[:-1])
        if tuple(y.shape) != want:
            raise ShapeError(
                f"y has shape {list(y.shape)}; sparse labels must have shape {list(want)} "
                f"(the model's output {list(out)} without its class axis)",
                field="y",
            )
        classes = out[-1]
        if y.size and (np.any(y != np.round(y)) or y.min() < 0 or y.max() >= classes):
            raise InvalidRequest(f"y holds class ids: integers in [0, {classes})", field="y")
        return
    want = (n, *out)
    if tuple(y.shape) != want:
        raise ShapeError(
            f"y has shape {list(y.shape)}; it must be {list(want)} "
            f"(batch + the model's output shape {list(out)})",
            field="y",
        )


def check_model_gradient_job(job: ModelGradientJob, layout: ModelShape, limits: Limits) -> None:
    """x, y, weights and tangents against the spec's layout; no input gradients of token ids."""
    _check_model_inputs(job, layout, limits, needs_y=True)
    needs_inputs = "inputs" in job.wrt or job.saliency or job.adversarial is not None
    if layout.integer_inputs and needs_inputs:
        raise NotDifferentiable(
            "this model's inputs are token ids (embedding first); they have no gradient", field="wrt"
        )
    if job.tangents is not None:
        check_tensors(job.tangents, layout.weights, "tangents")


def check_train_step_job(
    job: TrainStepJob, layout: ModelShape, state_layout: Sequence[TensorShape], limits: Limits
) -> None:
    """Steps; x, y, weights and optimizer state against the layouts; the objective's own inputs.

    ``state_layout`` is ``optimizer_state_layout(job.optimizer, layout)``.
    """
    check_steps(job.steps, limits)
    reinforce = job.objective.get("type") == "reinforce"
    _check_model_inputs(job, layout, limits, needs_y=not reinforce)
    check_optimizer_state(job.optimizer_state, state_layout)
    n = job.x.shape[0]
    if reinforce:
        if len(layout.output_shape) != 1:
            raise ShapeError(
                "reinforce needs a model whose output is one vector of action scores per state; "
                f"this one has shape {list(layout.output_shape)}",
                field="model.layers",
            )
        if job.actions is None or job.returns is None:
            raise InvalidRequest("reinforce needs actions and returns", field="objective")
        if job.actions.shape != (n,):
            raise ShapeError(
                f"objective.actions has {len(job.actions)} entries; x has {n} states",
                field="objective.actions",
            )
        count = layout.output_shape[0]
        for i, a in enumerate(job.actions.tolist()):
            if a != round(a) or a < 0 or a >= count:
                shown = int(a) if a == round(a) else a
                raise InvalidRequest(
                    f"objective.actions[{i}] is {shown}; the model has {count} actions (0..{count - 1})",
                    field=f"objective.actions[{i}]",
                )
        if job.returns.shape != (n,):
            raise ShapeError(
                f"objective.returns has shape {list(job.returns.shape)}; it must be [{n}] (one per state)",
                field="objective.returns",
            )
    elif layout.integer_inputs and job.objective.get("type") == "adversarial":
        raise NotDifferentiable(
            "adversarial training needs differentiable inputs, not token ids", field="objective"
        )


def check_expression_step_job(
    job: ExpressionStepJob, state_layout: Sequence[TensorShape], limits: Limits
) -> None:
    """Steps, the input count and the optimizer state against ``state_layout``.

    ``state_layout`` is ``optimizer_state_layout(job.optimizer, variables_layout(job.variables))``;
    the program's text is checked where it is parsed (``service.expr.program``).
    """
    check_steps(job.steps, limits)
    check_input_count(len(job.variables) + len(job.constants), limits)
    check_optimizer_state(job.optimizer_state, state_layout)
    loop_counts(job.constants, job.counts)
