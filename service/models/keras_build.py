"""Model specs become Keras models in code; losses, optimizers, clipping and optimizer state (TF side).

Nothing here deserializes user data: every layer, activation, initializer, regularizer, loss and
optimizer is looked up in a fixed table by name (never ``model_from_json``, Lambda layers or pickle).
Imported only in worker processes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf

from service.errors import InvalidRequest
from service.jobs.hyperparameters import (
    OPTIMIZER_DEFAULTS,
    OPTIMIZER_INITIAL,
    OPTIMIZER_RUNTIME,
    regularizer_kind,
)
from service.models.layout import StateInfo, init_seed, normalize_layer

__all__ = [
    "RuntimeValue",
    "apply_clip",
    "bind_hyperparameters",
    "build_model",
    "fresh_optimizer_state",
    "initial_weights",
    "make_loss",
    "make_optimizer",
    "make_variables",
    "optimizer_state",
    "optimizer_state_variables",
]


Regularizers = dict[tuple[int, str], keras.regularizers.Regularizer]  # (layer index, field) -> object


def _regularizer(spec: Mapping[str, float] | None) -> keras.regularizers.Regularizer | None:
    kind = regularizer_kind(spec)
    if kind is None or spec is None:
        return None
    l1, l2 = float(spec.get("l1", 0.0)), float(spec.get("l2", 0.0))
    if kind == "l1l2":
        return keras.regularizers.L1L2(l1=l1, l2=l2)
    if kind == "l1":
        return keras.regularizers.L1(l1)
    return keras.regularizers.L2(l2)


def _initializer(name: str, seed: int) -> keras.initializers.Initializer:
    cls = {
        "zeros": keras.initializers.Zeros,
        "ones": keras.initializers.Ones,
        "glorot_uniform": keras.initializers.GlorotUniform,
        "glorot_normal": keras.initializers.GlorotNormal,
        "he_uniform": keras.initializers.HeUniform,
        "he_normal": keras.initializers.HeNormal,
        "lecun_uniform": keras.initializers.LecunUniform,
        "lecun_normal": keras.initializers.LecunNormal,
        # Keras' "uniform" is RandomUniform(-0.05, 0.05), the embedding default.
        "uniform": keras.initializers.RandomUniform,
        "normal": keras.initializers.RandomNormal,
        "truncated_normal": keras.initializers.TruncatedNormal,
        "orthogonal": keras.initializers.Orthogonal,
    }[name]
    if name in ("zeros", "ones"):
        return cls()
    return cls(seed=seed)


def _layer(
    layer: dict[str, Any], index: int, model_seed: int, dtype: str, regularizers: Regularizers
) -> keras.layers.Layer:
    kind = layer["type"]
    common: dict[str, Any] = {"dtype": dtype, "name": f"layer_{index}"}

    def init(key: str, slot: int) -> keras.initializers.Initializer:
        return _initializer(layer[key], init_seed(model_seed, index, slot))

    def penalty(key: str) -> keras.regularizers.Regularizer | None:
        made = regularizers[(index, key)] = _regularizer(layer[key])
        return made

    def dense_like() -> dict[str, Any]:
        return {
            "activation": layer["activation"],
            "use_bias": layer["use_bias"],
            "kernel_initializer": init("kernel_initializer", 0),
            "bias_initializer": init("bias_initializer", 1),
            "kernel_regularizer": penalty("kernel_regularizer"),
            "bias_regularizer": penalty("bias_regularizer"),
            "activity_regularizer": penalty("activity_regularizer"),
            **common,
        }

    if kind == "dense":
        return keras.layers.Dense(layer["units"], **dense_like())
    if kind == "conv1d":
        return keras.layers.Conv1D(
            layer["filters"],
            layer["kernel_size"],
            strides=layer["strides"],
            padding=layer["padding"],
            **dense_like(),
        )
    if kind == "conv2d":
        return keras.layers.Conv2D(
            layer["filters"],
            layer["kernel_size"],
            strides=layer["strides"],
            padding=layer["padding"],
            **dense_like(),
        )
    if kind in ("max_pool2d", "avg_pool2d"):
        cls = keras.layers.MaxPooling2D if kind == "max_pool2d" else keras.layers.AveragePooling2D
        return cls(pool_size=layer["pool_size"], strides=layer["strides"], padding=layer["padding"], **common)
    if kind == "flatten":
        return keras.layers.Flatten(**common)
    if kind == "dropout":
        seed = layer["seed"] if layer["seed"] is not None else init_seed(model_seed, index, 0)
        return keras.layers.Dropout(layer["rate"], seed=seed, **common)
    if kind == "batch_norm":
        return keras.layers.BatchNormalization(momentum=layer["momentum"], epsilon=layer["epsilon"], **common)
    if kind == "layer_norm":
        return keras.layers.LayerNormalization(epsilon=layer["epsilon"], **common)
    if kind == "embedding":
        return keras.layers.Embedding(
            layer["input_dim"],
            layer["output_dim"],
            embeddings_initializer=init("embeddings_initializer", 0),
            embeddings_regularizer=penalty("embeddings_regularizer"),
            **common,
        )
    cls = {"simple_rnn": keras.layers.SimpleRNN, "lstm": keras.layers.LSTM, "gru": keras.layers.GRU}[kind]
    args = dense_like()
    args["recurrent_initializer"] = init("recurrent_initializer", 2)
    args["recurrent_regularizer"] = penalty("recurrent_regularizer")
    return cls(
        layer["units"],
        return_sequences=layer["return_sequences"],
        seed=init_seed(model_seed, index, 3),
        **args,
    )


def build_model(spec: Mapping[str, Any], dtype: str, regularizers: Regularizers | None = None) -> keras.Model:
    """The Keras model of a spec (layers made in code from the fixed table), built and seeded.

    ``regularizers`` (if given) receives every regularizer object by (layer index, spec field), for
    ``bind_hyperparameters``; fields without a regularizer map to None.
    """
    layers = [normalize_layer(raw, i) for i, raw in enumerate(spec["layers"])]
    integer = layers[0]["type"] == "embedding"
    inputs = keras.Input(tuple(spec["input_shape"]), dtype="int32" if integer else dtype)
    seed = int(spec.get("seed", 0))
    made: Regularizers = {} if regularizers is None else regularizers
    out = inputs
    for i, layer in enumerate(layers):
        out = _layer(layer, i, seed, dtype, made)(out)
    return keras.Model(inputs, out)


def initial_weights(model: keras.Model) -> list[np.ndarray]:
    return [np.asarray(w) for w in model.get_weights()]


def make_loss(
    loss: Mapping[str, Any], dtype: str, reduction: str | None = "sum_over_batch_size"
) -> keras.losses.Loss:
    """The loss in the computation dtype (Keras computes losses in float32 unless told otherwise)."""
    kind = loss["type"]
    logits = bool(loss.get("from_logits", False))
    common: dict[str, Any] = {"reduction": reduction, "dtype": dtype}
    if kind == "mse":
        return keras.losses.MeanSquaredError(**common)
    if kind == "mae":
        return keras.losses.MeanAbsoluteError(**common)
    if kind == "huber":
        return keras.losses.Huber(delta=float(loss.get("delta", 1.0)), **common)
    if kind == "binary_crossentropy":
        return keras.losses.BinaryCrossentropy(from_logits=logits, **common)
    if kind == "categorical_crossentropy":
        return keras.losses.CategoricalCrossentropy(from_logits=logits, **common)
    if kind == "sparse_categorical_crossentropy":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=logits, **common)
    raise InvalidRequest(f"unknown loss {kind!r}", field="loss.type")


def make_optimizer(config: Mapping[str, Any]) -> keras.optimizers.Optimizer:
    """A Keras 3 optimizer from its allow-listed name and hyper-parameters (apply_clip clips)."""
    kind = config["type"]
    args = {**OPTIMIZER_DEFAULTS[kind], **{k: v for k, v in config.items() if k != "type"}}
    cls = {
        "sgd": keras.optimizers.SGD,
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "rmsprop": keras.optimizers.RMSprop,
        "adagrad": keras.optimizers.Adagrad,
    }[kind]
    optimizer: keras.optimizers.Optimizer = cls(**args)
    return optimizer


def make_variables(shapes: Sequence[tuple[int, ...]], dtype: str) -> list[keras.Variable]:
    """Zero-filled Keras variables (an expression step's, which an optimizer updates)."""
    return [keras.Variable(np.zeros(shape), dtype=dtype, name=f"v{i}") for i, shape in enumerate(shapes)]


def optimizer_state_variables(
    optimizer: keras.optimizers.Optimizer, layout: Sequence[StateInfo] | None = None
) -> list[Any]:
    """Keras' state variables (no learning_rate), in the order ``layout.optimizer_state_layout`` documents.

    That layout is the one definition of the state's order; given it (``optimizer_state_layout`` of
    the optimizer's config and the weights it was built on), Keras' variables are checked against it
    (shape and slot name): a Keras release that reorders them fails here, not in a client's results.
    """
    lr = optimizer._learning_rate  # a variable for float rates; excluded: it comes from the request
    variables = [v for v in optimizer.variables if v is not lr]
    if layout is not None:
        found = [(v.path.rsplit("/", 1)[-1], tuple(v.shape)) for v in variables]
        slots = [info.name.rsplit("/", 1)[-1] for info in layout]
        if len(found) != len(layout) or any(
            shape != info.shape or not name.endswith(slot)
            for (name, shape), info, slot in zip(found, layout, slots, strict=False)
        ):
            raise RuntimeError(
                f"Keras' optimizer state {found} differs from the documented layout "
                f"{[(info.name, info.shape) for info in layout]}"
            )
    return variables


def optimizer_state(optimizer: keras.optimizers.Optimizer, dtype: str) -> list[np.ndarray]:
    return [np.asarray(v.numpy(), dtype=dtype) for v in optimizer_state_variables(optimizer)]


def fresh_optimizer_state(template: list[np.ndarray], config: Mapping[str, Any]) -> list[np.ndarray]:
    """A fresh optimizer's state for ``config``, from that of another config of the same structure.

    Only Adagrad's differs: its accumulators start at ``initial_accumulator_value`` (the iteration
    count comes first, then one accumulator per trainable weight). Keras fills them with
    ``ops.cast(value, dtype)``, which makes the Python float float32 first, even for float64 weights.
    """
    if "initial_accumulator_value" not in OPTIMIZER_INITIAL.get(config["type"], ()):
        return template
    start = np.float32({**OPTIMIZER_DEFAULTS["adagrad"], **config}["initial_accumulator_value"])
    return [template[0], *(np.full_like(a, start) for a in template[1:])]


def apply_clip(grads: list[Any], clip: str | None, threshold: Any = None) -> list[Any]:
    """Gradient clipping as Keras' clipvalue / clipnorm (per tensor) / global_clipnorm.

    ``clip`` is the kind ("value", "norm", "global_norm" or None); ``threshold`` a tensor (a
    run-time input of the step) or a number.
    """
    if clip is None:
        return grads
    if clip == "value":
        return [tf.clip_by_value(g, -threshold, threshold) for g in grads]
    if clip == "norm":
        return [tf.clip_by_norm(g, threshold) for g in grads]
    clipped, _ = tf.clip_by_global_norm(grads, threshold)
    return list(clipped)


# --- hyper-parameters as run-time inputs (service/jobs/hyperparameters.py says which)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _refuse(value: Any, *args: Any) -> Any:
    raise TypeError("a run-time hyper-parameter has no Python value while a step is traced")


class RuntimeValue(float):
    """A hyper-parameter read from the traced step's inputs, standing in for the Python float Keras keeps.

    A float (the value the program was built with) whose every use in a traced graph is the
    step's float64 input instead, with the conversions a Python float gets, so a step computes
    exactly what Keras computes with the float itself:

    * Keras' binary ops keep Python numbers as weakly typed scalars (``ops.add(v, self.epsilon)``):
      ``dtype`` says ``float``, and the conversion to the other operand's dtype casts the input;
    * converted without a dtype (``ops.cast(self.beta_1, dtype)`` is ``tf.cast``), a Python float
      becomes float32 first; so does this, and Keras' float64 steps round as they always did;
    * Python arithmetic with a Python number (``1 - self.beta_1``) is computed in float64, as
      Python computes it, and stays a run-time value; with a tensor it is a tensor;
    * Python tests (``if self.momentum != 0`` in SGD, ``if self.l1`` in L1L2, ``> 0``) see the
      built value. They decide which slots and ops exist, so they are part of the program's cache
      key (``optimizer_structure``, ``regularizer_kind``) and hold for every value it is fed.

    ``float(x)`` is refused: code that wanted the number itself at trace time would bake one job's
    value into the program, so it fails loudly instead.
    """

    dtype = float  # what Keras' result_type sees: a weakly typed Python float

    _value: Any  # a float64 scalar tensor of the traced graph

    def __new__(cls, value: Any, built: float) -> RuntimeValue:
        made = super().__new__(cls, built)
        made._value = value
        return made

    __float__ = _refuse

    def __tf_tensor__(self, dtype: Any = None, name: str | None = None) -> Any:
        return tf.cast(self._value, dtype or tf.float32, name=name)

    def _tensor_like(self, other: Any) -> Any:
        return self.__tf_tensor__(getattr(other, "dtype", None))

    def _apply(self, other: Any, op: Any, reflected: bool) -> Any:
        if isinstance(other, RuntimeValue):
            theirs, their_built = other._value, other.real
        elif _is_number(other):  # float64 arithmetic, as Python does it
            theirs = their_built = float(other)
        else:  # a tensor: the conversion it gives a Python float
            mine = self._tensor_like(other)
            return op(other, mine) if reflected else op(mine, other)
        if reflected:
            return RuntimeValue(op(theirs, self._value), op(their_built, self.real))
        return RuntimeValue(op(self._value, theirs), op(self.real, their_built))

    def __add__(self, other: Any) -> Any:
        return self._apply(other, _add, False)

    def __radd__(self, other: Any) -> Any:
        return self._apply(other, _add, True)

    def __sub__(self, other: Any) -> Any:
        return self._apply(other, _sub, False)

    def __rsub__(self, other: Any) -> Any:
        return self._apply(other, _sub, True)

    def __mul__(self, other: Any) -> Any:
        return self._apply(other, _mul, False)

    def __rmul__(self, other: Any) -> Any:
        return self._apply(other, _mul, True)

    def __truediv__(self, other: Any) -> Any:
        return self._apply(other, _div, False)

    def __rtruediv__(self, other: Any) -> Any:
        return self._apply(other, _div, True)

    def __pow__(self, other: Any, modulo: Any = None) -> Any:
        if modulo is not None:
            return _refuse(self)
        return self._apply(other, _pow, False)

    def __rpow__(self, other: Any, modulo: Any = None) -> Any:
        if modulo is not None:
            return _refuse(self)
        return self._apply(other, _pow, True)

    def __neg__(self) -> RuntimeValue:
        return RuntimeValue(-self._value, -self.real)

    def __pos__(self) -> RuntimeValue:
        return self

    def __abs__(self) -> RuntimeValue:
        return RuntimeValue(tf.abs(self._value), abs(self.real))

    # The rest of float's operators would compute with the built value: refused, like float().
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __divmod__ = __rdivmod__ = _refuse
    __int__ = __trunc__ = __floor__ = __ceil__ = __round__ = _refuse


def _add(a: Any, b: Any) -> Any:
    return a + b


def _sub(a: Any, b: Any) -> Any:
    return a - b


def _mul(a: Any, b: Any) -> Any:
    return a * b


def _div(a: Any, b: Any) -> Any:
    return a / b


def _pow(a: Any, b: Any) -> Any:
    return a**b


@contextlib.contextmanager
def bind_hyperparameters(
    values: Any,
    dtype: str,
    optimizer: keras.optimizers.Optimizer | None = None,
    optimizer_type: str | None = None,
    clip: str | None = None,
    regularizers: Sequence[keras.regularizers.Regularizer] = (),
) -> Iterator[Any]:
    """While a step is traced: the optimizer's and regularizers' floats read from ``values``.

    ``values`` is the step's float64 hyper-parameter input, laid out as a job's
    ``hyperparameters()``: the optimizer's ``OPTIMIZER_RUNTIME`` floats, the clip threshold (if
    ``clip``), then l1 and l2 of each of ``regularizers`` (the model's, in ``regularizer_slots``
    order). The learning rate is assigned to the optimizer's float32 variable (so it rounds as
    Keras rounds it); the others replace the Python attributes by ``RuntimeValue``s, restored on
    exit. Yields the clip threshold (a tensor of ``dtype``, as a Python float converts) or None.
    """
    scalars = iter(tf.unstack(values))
    saved: list[tuple[Any, str, Any]] = []

    def swap(owner: Any, name: str, value: Any) -> None:
        built = getattr(owner, name)
        saved.append((owner, name, built))
        # Keras' L1 keeps its strength as a float32 tensor, which ops.cast converts as it converts
        # the RuntimeValue: through float32.
        setattr(owner, name, RuntimeValue(value, float(built)))

    try:
        if optimizer is not None and optimizer_type is not None:
            names = OPTIMIZER_RUNTIME[optimizer_type]
            for name in names:
                value = next(scalars)
                if name == "learning_rate":
                    optimizer.learning_rate.assign(tf.cast(value, optimizer.learning_rate.dtype))
                else:
                    swap(optimizer, name, value)
        threshold = None if clip is None else tf.cast(next(scalars), dtype)
        for penalty in regularizers:
            l1, l2 = next(scalars), next(scalars)
            if isinstance(penalty, keras.regularizers.L1L2):
                swap(penalty, "l1", l1)
                swap(penalty, "l2", l2)
            elif isinstance(penalty, keras.regularizers.L1):
                swap(penalty, "l1", l1)
            elif isinstance(penalty, keras.regularizers.L2):
                swap(penalty, "l2", l2)
            else:
                raise TypeError(f"no run-time strengths for the regularizer {penalty!r}")
        yield threshold
    finally:
        for owner, name, built in reversed(saved):
            setattr(owner, name, built)
