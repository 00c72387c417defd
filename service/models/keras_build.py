"""Model specs become Keras models in code; losses, optimizers, clipping and optimizer state (TF side).

Nothing here deserializes user data: every layer, activation, initializer, regularizer, loss and
optimizer is looked up in a fixed table by name (never ``model_from_json``, Lambda layers or pickle).
Imported only in worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf

from service.errors import InvalidRequest
from service.models.layout import (
    OPTIMIZER_DEFAULTS,
    init_seed,
    normalize_layer,
)

__all__ = [
    "apply_clip",
    "build_model",
    "initial_weights",
    "make_loss",
    "make_optimizer",
    "optimizer_state",
    "optimizer_state_variables",
]


def _regularizer(spec: Mapping[str, float] | None) -> keras.regularizers.Regularizer | None:
    if not spec:
        return None
    l1, l2 = float(spec.get("l1", 0.0)), float(spec.get("l2", 0.0))
    if l1 and l2:
        return keras.regularizers.L1L2(l1=l1, l2=l2)
    if l1:
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


def _layer(layer: dict[str, Any], index: int, model_seed: int, dtype: str) -> keras.layers.Layer:
    kind = layer["type"]
    common: dict[str, Any] = {"dtype": dtype, "name": f"layer_{index}"}

    def init(key: str, slot: int) -> keras.initializers.Initializer:
        return _initializer(layer[key], init_seed(model_seed, index, slot))

    def dense_like() -> dict[str, Any]:
        return {
            "activation": layer["activation"],
            "use_bias": layer["use_bias"],
            "kernel_initializer": init("kernel_initializer", 0),
            "bias_initializer": init("bias_initializer", 1),
            "kernel_regularizer": _regularizer(layer["kernel_regularizer"]),
            "bias_regularizer": _regularizer(layer["bias_regularizer"]),
            "activity_regularizer": _regularizer(layer["activity_regularizer"]),
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
            embeddings_regularizer=_regularizer(layer["embeddings_regularizer"]),
            **common,
        )
    cls = {"simple_rnn": keras.layers.SimpleRNN, "lstm": keras.layers.LSTM, "gru": keras.layers.GRU}[kind]
    args = dense_like()
    args["recurrent_initializer"] = init("recurrent_initializer", 2)
    args["recurrent_regularizer"] = _regularizer(layer["recurrent_regularizer"])
    return cls(
        layer["units"],
        return_sequences=layer["return_sequences"],
        seed=init_seed(model_seed, index, 3),
        **args,
    )


def build_model(spec: Mapping[str, Any], dtype: str) -> keras.Model:
    """The Keras model of a spec (layers made in code from the fixed table), built and seeded."""
    layers = [normalize_layer(raw, i) for i, raw in enumerate(spec["layers"])]
    integer = layers[0]["type"] == "embedding"
    inputs = keras.Input(tuple(spec["input_shape"]), dtype="int32" if integer else dtype)
    seed = int(spec.get("seed", 0))
    out = inputs
    for i, layer in enumerate(layers):
        out = _layer(layer, i, seed, dtype)(out)
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


def optimizer_state_variables(optimizer: keras.optimizers.Optimizer) -> list[Any]:
    """The state variables in the documented order: iteration, then the slots (no learning_rate)."""
    lr = optimizer._learning_rate  # a variable for float rates; excluded: it comes from the request
    return [v for v in optimizer.variables if v is not lr]


def optimizer_state(optimizer: keras.optimizers.Optimizer, dtype: str) -> list[np.ndarray]:
    return [np.asarray(v.numpy(), dtype=dtype) for v in optimizer_state_variables(optimizer)]


def apply_clip(grads: list[Any], clip: Mapping[str, float] | None) -> list[Any]:
    """Gradient clipping as Keras' clipvalue / clipnorm (per tensor) / global_clipnorm."""
    if not clip:
        return grads
    if "value" in clip:
        c = clip["value"]
        return [tf.clip_by_value(g, -c, c) for g in grads]
    if "norm" in clip:
        return [tf.clip_by_norm(g, clip["norm"]) for g in grads]
    clipped, _ = tf.clip_by_global_norm(grads, clip["global_norm"])
    return list(clipped)
