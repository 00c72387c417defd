"""The engine's plain-data jobs and results: numpy arrays and Python values, no TensorFlow.

The API builds jobs, the worker pool carries them to a worker process (numpy buffers travel as
raw bytes), and ``service.engine.execute`` turns each into its result inside the worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from service.models.hyperparameters import (
    clip_kind,
    clip_values,
    model_structure,
    optimizer_structure,
    optimizer_values,
    regularizer_values,
)

__all__ = [
    "DERIVATIVES",
    "StackedGradientJob",
    "ExpressionStepJob",
    "ExpressionStepResult",
    "GradientJob",
    "GradientResult",
    "Job",
    "ModelGradientJob",
    "ModelGradientResult",
    "Result",
    "StepRecord",
    "TrainStepJob",
    "TrainStepResult",
]

DERIVATIVES = ("gradient", "jacobian", "hessian", "hvp", "jvp", "vjp")

# Arrays up to this size cross the worker pipe as plain (dtype, shape, bytes) tuples inside the pickle
# stream: pickling an ndarray object costs ~15 us, its bytes ~1 us. Larger ones stay ndarrays, which
# the transport sends out of band without copying.
_PACK_MAX_BYTES = 4096

_Packed = Any  # tuple[str, tuple[int, ...], bytes] for a small array, else the array itself


def _pack(array: Any) -> _Packed:
    if type(array) is np.ndarray and array.nbytes <= _PACK_MAX_BYTES:
        return (array.dtype.str, array.shape, array.tobytes())
    if isinstance(array, np.generic):  # a numpy scalar (a 0-d tensor's .numpy()): shape None
        return (array.dtype.str, None, array.tobytes())
    return array


def _unpack(packed: _Packed) -> Any:
    if type(packed) is tuple:
        dtype, shape, raw = packed
        if shape is None:
            return np.frombuffer(raw, dtype)[0]
        # A bytearray, so the array is writable, as the sender's was.
        return np.frombuffer(bytearray(raw), dtype).reshape(shape)
    return packed


@dataclass(slots=True)
class GradientJob:
    """One forward evaluation of an expression and every derivative asked of it."""

    expression: str
    variables: dict[str, np.ndarray]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    # name -> {"params": [...], "body": str, "gradient": {param: str} | None}, in definition order
    functions: dict[str, dict[str, Any]] = field(default_factory=dict)
    derivatives: tuple[str, ...] = ("gradient",)
    wrt: tuple[str, ...] | None = None  # None: every variable
    tangents: dict[str, np.ndarray] = field(default_factory=dict)
    cotangent: np.ndarray | None = None
    order: int | None = None  # k-th derivative of a scalar expression w.r.t. one variable
    batch: bool = False
    dtype: str = "float32"

    def signature(self) -> str:
        """What the compiled program depends on: text, shapes, dtypes and the derivative set."""

        def shapes(arrays: dict[str, np.ndarray]) -> str:
            return ",".join(f"{k}{list(v.shape)}" for k, v in arrays.items())

        return "|".join(
            [
                self.expression,
                repr(list(self.functions.items())),
                shapes(self.variables),
                shapes(self.constants),
                ",".join(sorted(self.derivatives)),
                ",".join(self.wrt) if self.wrt is not None else "*",
                shapes(self.tangents),
                "-" if self.cotangent is None else str(list(self.cotangent.shape)),
                str(self.order),
                str(self.batch),
                self.dtype,
            ]
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self)


@dataclass(slots=True)
class GradientResult:
    value: np.ndarray
    gradient: dict[str, np.ndarray] | None = None
    jacobian: dict[str, np.ndarray] | None = None
    hessian: dict[str, dict[str, np.ndarray]] | None = None
    hvp: dict[str, np.ndarray] | None = None
    jvp: np.ndarray | None = None
    vjp: dict[str, np.ndarray] | None = None
    # `order` k: derivatives[i] is the (i+1)-th derivative tensor, shape var.shape * (i+1)
    higher: dict[str, Any] | None = None
    cache: str = "miss"  # "hit" | "miss": whether the compiled program was already cached
    compute_ms: float = 0.0
    executor: str = "tensorflow"  # "tensorflow" | "numpy": who ran the traced graph (engine/plan.py)

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self)


@dataclass(slots=True)
class StackedGradientJob:
    """Several GradientJobs of one signature, run as one vectorized call (dynamic batching).

    The worker answers with a list of GradientResults, one per job, in order.
    """

    jobs: list[GradientJob]

    def signature(self) -> str:
        return "stacked|" + self.jobs[0].signature()


def _array_shapes(arrays: list[np.ndarray] | None) -> str:
    return "-" if arrays is None else ",".join(str(list(a.shape)) for a in arrays)


def _plain(value: Any) -> str:
    """A stable text form of plain spec data (dicts keep insertion order, which the API fixes)."""
    return repr(value)


def _hyperparameters(values: list[float]) -> np.ndarray:
    """The float64 vector of a compiled program's hyper-parameters (service/models/hyperparameters.py)."""
    return np.array(values, np.float64)


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

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self)


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

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self)


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

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self)


@dataclass(slots=True)
class StepRecord:
    """One optimizer step: the loss before it and the gradient norms it used."""

    loss: float
    data_loss: float
    regularization_loss: float
    gradient_norm: float
    clipped_gradient_norm: float


@dataclass(slots=True)
class TrainStepResult:
    history: list[StepRecord]  # one per step; the last one is the response's top level
    weights: list[np.ndarray]
    optimizer_state: list[np.ndarray]
    gradients: list[np.ndarray] | None = None  # of the last step, before clipping
    cache: str = "miss"
    compute_ms: float = 0.0

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self)


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
            ]
        )

    def hyperparameters(self) -> np.ndarray:
        """The run-time inputs of the compiled step: the optimizer's floats, then the clip threshold."""
        return _hyperparameters(optimizer_values(self.optimizer) + clip_values(self.clip))

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self)


@dataclass(slots=True)
class ExpressionStepResult:
    history: list[StepRecord]  # loss = the expression's value before each step
    variables: dict[str, np.ndarray]
    optimizer_state: list[np.ndarray]
    cache: str = "miss"
    compute_ms: float = 0.0

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self)


# The fields of each job and result that hold arrays (arrays, or lists and dicts nesting them, or
# None): their small arrays are packed for the pipe (the hot path of every request; see ``_pack``).
# Everything else pickles as it is.
_ARRAY_FIELDS: dict[type, tuple[str, ...]] = {
    GradientJob: ("variables", "constants", "tangents", "cotangent"),
    GradientResult: ("value", "gradient", "jacobian", "hessian", "hvp", "jvp", "vjp", "higher"),
    ModelGradientJob: ("x", "y", "weights", "tangents"),
    ModelGradientResult: ("weights", "weight_gradients", "input_gradients", "saliency", "hvp", "x_adv"),
    TrainStepJob: ("x", "y", "weights", "optimizer_state", "actions", "returns"),
    TrainStepResult: ("weights", "optimizer_state", "gradients"),
    ExpressionStepJob: ("variables", "constants", "optimizer_state"),
    ExpressionStepResult: ("variables", "optimizer_state"),
}


def _pack_value(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [_pack_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _pack_value(v) for k, v in value.items()}
    return _pack(value)


def _unpack_value(value: Any) -> Any:
    """The inverse of ``_pack_value``: in array fields, the only tuples are packed arrays."""
    if value is None:
        return None
    if isinstance(value, list):
        return [_unpack_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _unpack_value(v) for k, v in value.items()}
    return _unpack(value)


def _layout(cls: type) -> tuple[tuple[str, bool], ...]:
    """(field name, holds arrays) for each field of a job or result class, computed once per class."""
    layout = _LAYOUTS.get(cls)
    if layout is None:
        arrays = _ARRAY_FIELDS[cls]
        layout = _LAYOUTS[cls] = tuple((f.name, f.name in arrays) for f in fields(cls))
    return layout


_LAYOUTS: dict[type, tuple[tuple[str, bool], ...]] = {}


def _reduce(obj: Any) -> tuple[Any, ...]:
    """Compact pickling of a dataclass job or result: its field values, array fields packed."""
    layout = _layout(type(obj))
    values = tuple(_pack_value(getattr(obj, n)) if packed else getattr(obj, n) for n, packed in layout)
    return _rebuild, (type(obj), values)


def _rebuild(cls: type, values: tuple[Any, ...]) -> Any:
    return cls(
        *(_unpack_value(v) if packed else v for (_, packed), v in zip(_layout(cls), values, strict=True))
    )


Job = GradientJob | ModelGradientJob | TrainStepJob | ExpressionStepJob
Result = GradientResult | ModelGradientResult | TrainStepResult | ExpressionStepResult
