"""Calls and results of the model and step endpoints (issue 4): describe, model gradient, adversarial
examples, training steps (also streamed as NDJSON progress) and optimizer steps on expressions.

Specs, optimizers, losses, clipping and objectives are plain dicts as the API documents them; a
string is accepted where the API takes ``{"type": name}`` (``optimizer="adam"``, ``loss="mse"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from service.client._builder import Expr, render
from service.client._exceptions import DecodingError
from service.client._requests import Call, function_spec
from service.client._wire import TensorCodec, decode_map, decode_tensor_field

__all__ = [
    "PROGRESS_LINES",
    "ModelDescription",
    "ModelGradient",
    "StepHistory",
    "StepResult",
    "TrainProgress",
    "TrainResult",
    "WeightInfo",
    "describe_call",
    "model_gradient_call",
    "parse_train_line",
    "step_call",
    "train_call",
]

# Progress lines a streamed run asks for by default: enough for a smooth bar, few enough that each
# chunk (one pool job on the server) still does real work.
PROGRESS_LINES = 100


@dataclass(frozen=True)
class WeightInfo:
    name: str
    shape: tuple[int, ...]
    trainable: bool


@dataclass(frozen=True)
class ModelDescription:
    """A spec's weights in ``get_weights()`` order, parameter counts and shapes."""

    weights: list[WeightInfo]
    param_count: int
    trainable_count: int
    output_shape: tuple[int, ...]
    layer_output_shapes: list[tuple[int, ...]]
    optimizer_state: list[WeightInfo] | None


@dataclass(frozen=True)
class ModelGradient:
    """Loss and gradients of a model on a batch; what was not asked for is None."""

    loss: float
    data_loss: float
    regularization_loss: float
    weight_gradients: list[np.ndarray] | None
    input_gradients: np.ndarray | None
    saliency: np.ndarray | None
    hvp: list[np.ndarray] | None
    x_adv: np.ndarray | None
    adversarial_loss: float | None
    weights: list[np.ndarray] | None  # the seeded initial weights, when none were sent
    meta: dict[str, Any]


@dataclass(frozen=True)
class StepHistory:
    loss: float
    data_loss: float
    regularization_loss: float
    gradient_norm: float
    clipped_gradient_norm: float


@dataclass(frozen=True)
class TrainResult:
    """After the last step: its loss and norms (before its update), new weights and optimizer state."""

    loss: float
    data_loss: float
    regularization_loss: float
    gradient_norm: float
    clipped_gradient_norm: float
    weights: list[np.ndarray]
    optimizer_state: list[np.ndarray]
    gradients: list[np.ndarray] | None
    history: list[StepHistory] | None
    steps: int
    meta: dict[str, Any]


@dataclass(frozen=True)
class TrainProgress:
    """One progress line of a streamed run: ``step`` of ``steps`` done, with that step's numbers."""

    step: int
    steps: int
    loss: float | None
    raw: dict[str, Any]  # the whole line, for fields this client does not know


@dataclass(frozen=True)
class StepResult:
    """``POST /v1/step``: the value before the last step, the variables after it."""

    value: float
    gradient_norm: float
    clipped_gradient_norm: float
    variables: dict[str, np.ndarray]
    optimizer_state: list[np.ndarray]
    history: list[StepHistory] | None
    steps: int
    meta: dict[str, Any]


# -- request building -------------------------------------------------------------------------------


def _typed(value: str | Mapping[str, Any] | None, what: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return {"type": value}
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{what} must be a name or a dict, not {type(value).__name__}")


def _tensors(codec: TensorCodec, values: Sequence[ArrayLike], dtype: str | None, where: str) -> list[Any]:
    return [codec.encode(value, dtype, f"{where}[{i}]") for i, value in enumerate(values)]


def _model_body(
    codec: TensorCodec,
    model: Mapping[str, Any],
    x: ArrayLike,
    y: ArrayLike | None,
    weights: Sequence[ArrayLike] | None,
    loss: str | Mapping[str, Any] | None,
    dtype: str | None,
    timeout_s: float | None,
) -> dict[str, Any]:
    wire_dtype = dtype or "float32"
    body: dict[str, Any] = {"model": dict(model), "x": codec.encode(x, wire_dtype, "x")}
    if y is not None:
        body["y"] = codec.encode(y, wire_dtype, "y")
    if weights is not None:
        body["weights"] = _tensors(codec, weights, wire_dtype, "weights")
    if loss is not None:
        body["loss"] = _typed(loss, "loss")
    if dtype is not None:
        body["dtype"] = dtype
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    if codec.wants_base64(int(np.size(x)) + sum(int(np.size(w)) for w in weights or [])):
        body["encoding"] = "base64"
    return body


def describe_call(
    model: Mapping[str, Any], optimizer: str | Mapping[str, Any] | None
) -> Call[ModelDescription]:
    body: dict[str, Any] = {"model": dict(model)}
    if optimizer is not None:
        body["optimizer"] = _typed(optimizer, "optimizer")
    return Call("POST", "/v1/model/describe", body, _parse_description)


def model_gradient_call(
    codec: TensorCodec,
    model: Mapping[str, Any],
    x: ArrayLike,
    y: ArrayLike | None,
    *,
    weights: Sequence[ArrayLike] | None,
    loss: str | Mapping[str, Any] | None,
    wrt: Sequence[str] | str | None,
    tangents: Sequence[ArrayLike] | None,
    saliency: bool,
    adversarial: Mapping[str, Any] | None,
    training: bool,
    dtype: str | None,
    timeout_s: float | None,
) -> Call[ModelGradient]:
    body = _model_body(codec, model, x, y, weights, loss, dtype, timeout_s)
    if wrt is not None:
        body["wrt"] = [wrt] if isinstance(wrt, str) else list(wrt)
    if tangents is not None:
        body["tangents"] = _tensors(codec, tangents, dtype or "float32", "tangents")
    if saliency:
        body["saliency"] = True
    if adversarial is not None:
        body["adversarial"] = dict(adversarial)
    if training:
        body["training"] = True
    wire_dtype = dtype or "float32"
    return Call(
        "POST", "/v1/model/gradient", body, lambda payload: _parse_model_gradient(payload, wire_dtype)
    )


def train_call(
    codec: TensorCodec,
    model: Mapping[str, Any],
    x: ArrayLike,
    y: ArrayLike | None,
    *,
    optimizer: str | Mapping[str, Any],
    weights: Sequence[ArrayLike] | None,
    optimizer_state: Sequence[ArrayLike] | None,
    loss: str | Mapping[str, Any] | None,
    clip: Mapping[str, Any] | None,
    objective: str | Mapping[str, Any] | None,
    steps: int,
    return_gradients: bool,
    stream: bool,
    progress_every: int | None,
    dtype: str | None,
    timeout_s: float | None,
) -> Call[TrainResult]:
    body = _model_body(codec, model, x, y, weights, loss, dtype, timeout_s)
    body["optimizer"] = _typed(optimizer, "optimizer")
    wire_dtype = dtype or "float32"
    if optimizer_state is not None:
        # The state's first entry is the iteration count: sent as it came, never cast to float32.
        body["optimizer_state"] = _tensors(codec, optimizer_state, None, "optimizer_state")
    if clip is not None:
        body["clip"] = dict(clip)
    if objective is not None:
        body["objective"] = _objective(codec, objective, wire_dtype)
    body["steps"] = steps
    if return_gradients:
        body["return_gradients"] = True
    if stream:
        body["stream"] = True
        body["progress_every"] = progress_every or max(1, steps // PROGRESS_LINES)
    return Call("POST", "/v1/model/train-step", body, lambda payload: _parse_train(payload, wire_dtype))


def _objective(codec: TensorCodec, objective: str | Mapping[str, Any], dtype: str) -> dict[str, Any]:
    out = _typed(objective, "objective") or {}
    if "returns" in out and not isinstance(out["returns"], list | Mapping):
        out["returns"] = codec.encode(out["returns"], dtype, "objective.returns")
    if "actions" in out:
        out["actions"] = [int(a) for a in np.asarray(out["actions"]).reshape(-1)]
    return out


def step_call(
    codec: TensorCodec,
    expression: Expr | str,
    variables: Mapping[str, ArrayLike],
    *,
    optimizer: str | Mapping[str, Any],
    optimizer_state: Sequence[ArrayLike] | None,
    constants: Mapping[str, ArrayLike] | None,
    functions: Mapping[str, Any] | None,
    clip: Mapping[str, Any] | None,
    steps: int,
    dtype: str | None,
    timeout_s: float | None,
) -> Call[StepResult]:
    wire_dtype = dtype or "float32"
    body: dict[str, Any] = {
        "expression": render(expression),
        "variables": codec.encode_map(variables, wire_dtype, "variables"),
        "optimizer": _typed(optimizer, "optimizer"),
    }
    if constants:
        body["constants"] = codec.encode_map(constants, wire_dtype, "constants")
    if functions:
        body["functions"] = {name: function_spec(name, spec) for name, spec in functions.items()}
    if optimizer_state is not None:
        body["optimizer_state"] = _tensors(codec, optimizer_state, None, "optimizer_state")
    if clip is not None:
        body["clip"] = dict(clip)
    body["steps"] = steps
    if dtype is not None:
        body["dtype"] = dtype
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    if codec.wants_base64(sum(int(np.size(v)) for v in variables.values())):
        body["encoding"] = "base64"
    return Call("POST", "/v1/step", body, lambda payload: _parse_step(payload, wire_dtype))


# -- response parsing -------------------------------------------------------------------------------


def _body(payload: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise DecodingError(f"the {what} response is not a JSON object")
    return payload


def _float(body: Mapping[str, Any], name: str, what: str) -> float:
    value = body.get(name)
    if isinstance(value, str):
        try:
            return float(value)  # "NaN" / "Infinity" for a diverged loss
        except ValueError:
            pass
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise DecodingError(f"the {what} response's {name} is not a number")


def _opt_float(body: Mapping[str, Any], name: str, what: str) -> float | None:
    return None if body.get(name) is None else _float(body, name, what)


def _tensor_list(value: Any, dtype: str, where: str) -> list[np.ndarray]:
    if not isinstance(value, list):
        raise DecodingError(f"the response's {where} is not a list of tensors")
    return [decode_tensor_field(item, dtype, f"{where}[{i}]") for i, item in enumerate(value)]


def _opt_list(body: Mapping[str, Any], name: str, dtype: str) -> list[np.ndarray] | None:
    return None if body.get(name) is None else _tensor_list(body[name], dtype, name)


def _opt_tensor(body: Mapping[str, Any], name: str, dtype: str) -> np.ndarray | None:
    return None if body.get(name) is None else decode_tensor_field(body[name], dtype, name)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in value)


def _weights_info(items: Any) -> list[WeightInfo]:
    return [WeightInfo(str(w["name"]), _shape(w["shape"]), bool(w["trainable"])) for w in items]


def _parse_description(payload: Any) -> ModelDescription:
    body = _body(payload, "describe")
    try:
        state = body.get("optimizer_state")
        return ModelDescription(
            weights=_weights_info(body["weights"]),
            param_count=int(body["param_count"]),
            trainable_count=int(body["trainable_count"]),
            output_shape=_shape(body["output_shape"]),
            layer_output_shapes=[_shape(s) for s in body["layer_output_shapes"]],
            optimizer_state=None if state is None else _weights_info(state),
        )
    except (KeyError, TypeError, ValueError):
        raise DecodingError("the describe response is malformed") from None


def _parse_model_gradient(payload: Any, dtype: str) -> ModelGradient:
    body = _body(payload, "model gradient")
    what = "model gradient"
    return ModelGradient(
        loss=_float(body, "loss", what),
        data_loss=_float(body, "data_loss", what),
        regularization_loss=_float(body, "regularization_loss", what),
        weight_gradients=_opt_list(body, "weight_gradients", dtype),
        input_gradients=_opt_tensor(body, "input_gradients", dtype),
        saliency=_opt_tensor(body, "saliency", dtype),
        hvp=_opt_list(body, "hvp", dtype),
        x_adv=_opt_tensor(body, "x_adv", dtype),
        adversarial_loss=_opt_float(body, "adversarial_loss", what),
        weights=_opt_list(body, "weights", dtype),
        meta=dict(body.get("meta") or {}),
    )


def _history(value: Any, what: str) -> list[StepHistory] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise DecodingError(f"the {what} response's history is not a list")
    return [
        StepHistory(
            *(
                _float(_body(h, what), name, what)
                for name in (
                    "loss",
                    "data_loss",
                    "regularization_loss",
                    "gradient_norm",
                    "clipped_gradient_norm",
                )
            )
        )
        for h in value
    ]


def _state(value: Any, dtype: str) -> list[np.ndarray]:
    """The optimizer state as sent (the iteration count stays an integer when it is one)."""
    if not isinstance(value, list):
        raise DecodingError("the response's optimizer_state is not a list")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, int | list) and np.asarray(item).dtype.kind in "iu":
            out.append(np.asarray(item, dtype=np.int64))
        else:
            out.append(decode_tensor_field(item, dtype, f"optimizer_state[{i}]"))
    return out


def _parse_train(payload: Any, dtype: str) -> TrainResult:
    body = _body(payload, "train-step")
    what = "train-step"
    try:
        steps = int(body["steps"])
    except (KeyError, TypeError, ValueError):
        raise DecodingError("the train-step response has no steps") from None
    return TrainResult(
        loss=_float(body, "loss", what),
        data_loss=_float(body, "data_loss", what),
        regularization_loss=_float(body, "regularization_loss", what),
        gradient_norm=_float(body, "gradient_norm", what),
        clipped_gradient_norm=_float(body, "clipped_gradient_norm", what),
        weights=_tensor_list(body.get("weights"), dtype, "weights"),
        optimizer_state=_state(body.get("optimizer_state"), dtype),
        gradients=_opt_list(body, "gradients", dtype),
        history=_history(body.get("history"), what),
        steps=steps,
        meta=dict(body.get("meta") or {}),
    )


def _parse_step(payload: Any, dtype: str) -> StepResult:
    body = _body(payload, "step")
    what = "step"
    try:
        steps = int(body["steps"])
    except (KeyError, TypeError, ValueError):
        raise DecodingError("the step response has no steps") from None
    return StepResult(
        value=_float(body, "value", what),
        gradient_norm=_float(body, "gradient_norm", what),
        clipped_gradient_norm=_float(body, "clipped_gradient_norm", what),
        variables=decode_map(body.get("variables"), dtype, "variables"),
        optimizer_state=_state(body.get("optimizer_state"), dtype),
        history=_history(body.get("history"), what),
        steps=steps,
        meta=dict(body.get("meta") or {}),
    )


def is_final_line(line: Mapping[str, Any]) -> bool:
    """The streamed result (last line) carries the new weights; progress lines do not."""
    return "weights" in line or line.get("type") in ("result", "final")


def parse_train_line(line: Mapping[str, Any], dtype: str) -> TrainProgress | TrainResult:
    """One NDJSON line of a streamed train-step: a progress line, or the final result."""
    if is_final_line(line):
        return _parse_train(
            line.get("result", line) if line.get("type") in ("result", "final") else line, dtype
        )
    try:
        step = int(line["step"])
        steps = int(line.get("steps", line.get("total", step)))
    except (KeyError, TypeError, ValueError):
        raise DecodingError("a progress line of the stream has no step") from None
    loss = line.get("loss")
    return TrainProgress(
        step, steps, float(loss) if isinstance(loss, int | float | str) else None, dict(line)
    )
