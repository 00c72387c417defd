"""A model spec's weight layout, shapes and parameter count, computed without TensorFlow.

The spec is plain data (the API's pydantic models dumped to dicts). ``model_layout`` walks its
layers as Keras would build them and returns every weight in Keras ``get_weights()`` order, so the
API can refuse oversized or ill-shaped models before any worker builds one, and clients can map
weights by name. ``optimizer_state_layout`` does the same for an optimizer's state (Keras 3 order).
A test builds every layer type with Keras and compares.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.errors import InvalidRequest, LimitExceeded, ShapeError
from service.jobs.hyperparameters import OPTIMIZER_DEFAULTS
from service.limits import Limits

__all__ = [
    "ACTIVATIONS",
    "INITIALIZERS",
    "LAYER_DEFAULTS",
    "LAYER_TYPES",
    "ModelLayout",
    "StateInfo",
    "WeightInfo",
    "init_seed",
    "model_layout",
    "normalize_layer",
    "optimizer_state_layout",
    "variables_layout",
]

# Keras activation names that are plain math (no Python callables from the request).
ACTIVATIONS = (
    "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu", "swish", "sigmoid",
    "hard_sigmoid", "tanh", "softmax", "log_softmax", "softplus", "softsign", "exponential",
)  # fmt: skip
INITIALIZERS = (
    "zeros", "ones", "glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform",
    "lecun_normal", "uniform", "normal", "truncated_normal", "orthogonal",
)  # fmt: skip

_DENSE_LIKE: dict[str, Any] = {
    "activation": "linear",
    "use_bias": True,
    "kernel_initializer": "glorot_uniform",
    "bias_initializer": "zeros",
    "kernel_regularizer": None,
    "bias_regularizer": None,
    "activity_regularizer": None,
}
_RECURRENT: dict[str, Any] = {
    **_DENSE_LIKE,
    "activation": "tanh",
    "recurrent_initializer": "orthogonal",
    "recurrent_regularizer": None,
    "return_sequences": False,
}
# Every optional field of every layer type with its default; the API's schemas use the same values
# (a test checks), and specs built by hand in the engine are completed with them.
LAYER_DEFAULTS: dict[str, dict[str, Any]] = {
    "dense": {**_DENSE_LIKE},
    "conv1d": {**_DENSE_LIKE, "strides": 1, "padding": "valid"},
    "conv2d": {**_DENSE_LIKE, "strides": 1, "padding": "valid"},
    "max_pool2d": {"pool_size": 2, "strides": None, "padding": "valid"},
    "avg_pool2d": {"pool_size": 2, "strides": None, "padding": "valid"},
    "flatten": {},
    "dropout": {"rate": 0.5, "seed": None},
    "batch_norm": {"momentum": 0.99, "epsilon": 1e-3},
    "layer_norm": {"epsilon": 1e-3},
    "embedding": {"embeddings_initializer": "uniform", "embeddings_regularizer": None},
    "simple_rnn": {**_RECURRENT},
    "lstm": {**_RECURRENT},
    "gru": {**_RECURRENT},
}
LAYER_TYPES = tuple(LAYER_DEFAULTS)


@dataclass(frozen=True, slots=True)
class WeightInfo:
    name: str  # "layers[i].kernel"
    shape: tuple[int, ...]
    trainable: bool
    layer: int


@dataclass(frozen=True, slots=True)
class StateInfo:
    name: str  # "iteration" or "<weight name>/<slot>"
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelLayout:
    weights: tuple[WeightInfo, ...]  # Keras get_weights() order
    param_count: int
    trainable_count: int
    output_shapes: tuple[tuple[int, ...], ...]  # per layer, per example (no batch axis)
    integer_inputs: bool  # an embedding first: x holds token ids

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.output_shapes[-1]

    @property
    def trainable(self) -> tuple[WeightInfo, ...]:
        return tuple(w for w in self.weights if w.trainable)

    @property
    def largest_activation(self) -> int:
        """Elements of the largest per-example layer output (for the batch size check)."""
        return max((_numel(s) for s in self.output_shapes), default=1)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def init_seed(model_seed: int, layer: int, slot: int) -> int:
    """The seed of one weight's initializer: distinct per layer and weight, the same on every worker."""
    # 16 slots per layer is more than any layer type has; the modulus keeps seeds in int32.
    return (model_seed * 1_000_003 + layer * 16 + slot) % (2**31 - 1)


def normalize_layer(layer: Mapping[str, Any], index: int) -> dict[str, Any]:
    """The layer with every default filled in; unknown types and fields are refused."""
    kind = layer.get("type")
    where = f"model.layers[{index}]"
    if kind not in LAYER_DEFAULTS:
        raise InvalidRequest(
            f"{where}.type is {kind!r}; allowed: {', '.join(LAYER_TYPES)}", field=f"{where}.type"
        )
    out = {"type": kind, **LAYER_DEFAULTS[kind]}
    for key, value in layer.items():
        if key != "type" and key not in out and key not in _REQUIRED[kind]:
            raise InvalidRequest(f"{where} ({kind}) has no field {key!r}", field=f"{where}.{key}")
        out[key] = value
    for key in _REQUIRED[kind]:
        if key not in out:
            raise InvalidRequest(f"{where} ({kind}) needs {key!r}", field=f"{where}.{key}")
    return out


_REQUIRED: dict[str, tuple[str, ...]] = {
    "dense": ("units",),
    "conv1d": ("filters", "kernel_size"),
    "conv2d": ("filters", "kernel_size"),
    "max_pool2d": (),
    "avg_pool2d": (),
    "flatten": (),
    "dropout": (),
    "batch_norm": (),
    "layer_norm": (),
    "embedding": ("input_dim", "output_dim"),
    "simple_rnn": ("units",),
    "lstm": ("units",),
    "gru": ("units",),
}


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)


def _need_rank(shape: tuple[int, ...], rank: int, where: str, kind: str, what: str) -> None:
    if len(shape) != rank:
        raise ShapeError(
            f"{where} ({kind}) needs {what} per example (rank {rank}); its input has shape {list(shape)}",
            field=where,
        )


def _conv_length(length: int, kernel: int, stride: int, padding: str) -> int:
    if padding == "same":
        return -(-length // stride)
    return (length - kernel) // stride + 1 if length >= kernel else 0


def model_layout(spec: Mapping[str, Any], limits: Limits | None = None) -> ModelLayout:
    """Every weight (Keras order), each layer's output shape and the parameter count, checked against limits.

    Raises InvalidRequest / ShapeError naming ``model.layers[i].<field>``, or LimitExceeded.
    """
    limits = limits or Limits()
    layers = list(spec.get("layers") or [])
    if not layers:
        raise InvalidRequest("model.layers is empty; a model needs at least one layer", field="model.layers")
    if len(layers) > limits.max_layers:
        raise LimitExceeded(
            f"the model has {len(layers)} layers; at most {limits.max_layers} are allowed",
            limit="max_layers",
            allowed=limits.max_layers,
            requested=len(layers),
            field="model.layers",
        )
    shape = tuple(int(d) for d in spec.get("input_shape") or ())
    if not shape or any(d < 1 for d in shape):
        raise ShapeError(
            f"model.input_shape must be a non-empty list of positive sizes (no batch axis), "
            f"not {list(shape)}",
            field="model.input_shape",
        )
    if _numel(shape) > limits.max_input_elements:
        raise LimitExceeded(
            f"model.input_shape has {_numel(shape)} elements per example; "
            f"at most {limits.max_input_elements} are allowed",
            limit="max_input_elements",
            allowed=limits.max_input_elements,
            field="model.input_shape",
        )
    weights: list[WeightInfo] = []
    shapes: list[tuple[int, ...]] = []
    integer_inputs = False
    params = 0
    for i, raw in enumerate(layers):
        layer = normalize_layer(raw, i)
        kind = layer["type"]
        where = f"model.layers[{i}]"

        new: list[tuple[str, tuple[int, ...], bool]] = []  # (name, shape, trainable) of this layer

        for key in ("units", "filters", "input_dim", "output_dim"):
            if key in layer and (not isinstance(layer[key], int) or layer[key] < 1):
                raise InvalidRequest(
                    f"{where}.{key} must be a positive integer, not {layer[key]!r}", field=f"{where}.{key}"
                )
        if kind == "dense":
            if len(shape) < 1:
                _need_rank(shape, 1, where, kind, "a vector")
            new.append(("kernel", (shape[-1], layer["units"]), True))
            if layer["use_bias"]:
                new.append(("bias", (layer["units"],), True))
            shape = (*shape[:-1], layer["units"])
        elif kind in ("conv1d", "conv2d"):
            rank = 1 if kind == "conv1d" else 2
            what = "a (length, channels) array" if rank == 1 else "a (height, width, channels) image"
            _need_rank(shape, rank + 1, where, kind, what)
            kernel: tuple[int, ...] = _pair(layer["kernel_size"])[:rank]
            strides: tuple[int, ...] = _pair(layer["strides"])[:rank]
            spatial = tuple(
                _conv_length(n, k, s, layer["padding"])
                for n, k, s in zip(shape[:rank], kernel, strides, strict=True)
            )
            if any(d < 1 for d in spatial):
                raise ShapeError(
                    f"{where}.kernel_size {list(kernel)} is larger than its input {list(shape[:rank])} "
                    "(with padding 'valid')",
                    field=f"{where}.kernel_size",
                )
            new.append(("kernel", (*kernel, shape[-1], layer["filters"]), True))
            if layer["use_bias"]:
                new.append(("bias", (layer["filters"],), True))
            shape = (*spatial, layer["filters"])
        elif kind in ("max_pool2d", "avg_pool2d"):
            _need_rank(shape, 3, where, kind, "a (height, width, channels) image")
            pool = _pair(layer["pool_size"])
            strides = pool if layer["strides"] is None else _pair(layer["strides"])
            spatial = tuple(
                _conv_length(n, k, s, layer["padding"])
                for n, k, s in zip(shape[:2], pool, strides, strict=True)
            )
            if any(d < 1 for d in spatial):
                raise ShapeError(
                    f"{where}.pool_size {list(pool)} is larger than its input {list(shape[:2])}",
                    field=f"{where}.pool_size",
                )
            shape = (*spatial, shape[2])
        elif kind == "flatten":
            shape = (_numel(shape),)
        elif kind == "dropout":
            pass
        elif kind == "batch_norm":
            channels = (shape[-1],)
            new.append(("gamma", channels, True))
            new.append(("beta", channels, True))
            new.append(("moving_mean", channels, False))
            new.append(("moving_variance", channels, False))
        elif kind == "layer_norm":
            new.append(("gamma", (shape[-1],), True))
            new.append(("beta", (shape[-1],), True))
        elif kind == "embedding":
            if i != 0:
                raise InvalidRequest(
                    f"{where}: an embedding must be the first layer (its input is token ids)",
                    field=f"{where}.type",
                )
            integer_inputs = True
            new.append(("embeddings", (layer["input_dim"], layer["output_dim"]), True))
            shape = (*shape, layer["output_dim"])
        else:  # simple_rnn, lstm, gru
            _need_rank(shape, 2, where, kind, "a (time, features) sequence")
            units = layer["units"]
            gates = {"simple_rnn": 1, "lstm": 4, "gru": 3}[kind]
            new.append(("kernel", (shape[-1], gates * units), True))
            new.append(("recurrent_kernel", (units, gates * units), True))
            if layer["use_bias"]:
                # Keras' GRU defaults to reset_after=True: separate input and recurrent biases.
                new.append(("bias", (2, gates * units) if kind == "gru" else (gates * units,), True))
            shape = (shape[0], units) if layer["return_sequences"] else (units,)
        weights.extend(WeightInfo(f"{where}.{name}", wshape, trainable, i) for name, wshape, trainable in new)
        added = sum(_numel(wshape) for _, wshape, _ in new)
        params += added
        if params > limits.max_params:
            raise LimitExceeded(
                f"the model has more than {limits.max_params} parameters "
                f"({params} up to and including {where}, {kind})",
                limit="max_params",
                allowed=limits.max_params,
                requested=params,
                field=where,
            )
        shapes.append(shape)
    trainable = sum(_numel(w.shape) for w in weights if w.trainable)
    return ModelLayout(tuple(weights), params, trainable, tuple(shapes), integer_inputs)


def optimizer_state_layout(optimizer: Mapping[str, Any], layout: ModelLayout) -> tuple[StateInfo, ...]:
    """The optimizer's state tensors in Keras 3 ``optimizer.variables`` order, without learning_rate.

    The first entry is always the iteration count; slot variables follow for the trainable weights.
    """
    kind = optimizer["type"]
    config = {**OPTIMIZER_DEFAULTS[kind], **optimizer}
    weights = layout.trainable
    out = [StateInfo("iteration", ())]

    def per_weight(*slots: str) -> None:
        for w in weights:
            out.extend(StateInfo(f"{w.name}/{slot}", w.shape) for slot in slots)

    def each(slot: str) -> None:
        out.extend(StateInfo(f"{w.name}/{slot}", w.shape) for w in weights)

    if kind == "sgd":
        if config["momentum"] != 0:
            each("momentum")
    elif kind in ("adam", "adamw"):
        per_weight("momentum", "velocity")
        if config["amsgrad"]:
            each("velocity_hat")
    elif kind == "rmsprop":
        each("velocity")
        if config["momentum"] > 0:
            each("momentum")
        if config["centered"]:
            each("average_gradient")
    elif kind == "adagrad":
        each("accumulator")
    else:
        raise InvalidRequest(
            f"optimizer.type is {kind!r}; allowed: {', '.join(OPTIMIZER_DEFAULTS)}", field="optimizer.type"
        )
    return tuple(out)


def variables_layout(variables: Mapping[str, Any]) -> ModelLayout:
    """An expression step's variables (arrays by name) as trainable 'weights', so the optimizer state
    layout is computed the same way as a model's."""
    weights = tuple(WeightInfo(f"variables.{k}", tuple(v.shape), True, 0) for k, v in variables.items())
    return ModelLayout(weights, 0, 0, ((1,),), False)
