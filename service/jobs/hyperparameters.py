"""Which numbers of a job shape its compiled program and which are fed to it on every call.

A model or step program depends on the optimizer's type and its boolean options, on the kind of
gradient clipping and on which regularizers exist (and of which kind); the numbers themselves
(learning rate, momentum, betas, epsilon, rho, weight decay, clip thresholds, L1/L2 strengths)
are inputs of the traced graph, one float64 vector per call. So a learning-rate schedule, a
momentum warm-up or a regularization sweep compiles once. Jobs compute their signature (the cache
and worker-affinity key) and their hyper-parameter vector with these functions; TF-free.

The vector of a job is: ``optimizer_values``, then ``clip_values``, then ``regularizer_values``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "OPTIMIZER_DEFAULTS",
    "OPTIMIZER_INITIAL",
    "OPTIMIZER_RUNTIME",
    "REGULARIZER_FIELDS",
    "clip_kind",
    "clip_values",
    "model_structure",
    "optimizer_structure",
    "optimizer_values",
    "regularizer_kind",
    "regularizer_slots",
    "regularizer_values",
]

# Optimizer hyper-parameters and their defaults (Keras 3's own, so a client's mental model holds).
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"learning_rate": 0.01, "momentum": 0.0, "nesterov": False},
    "adam": {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7, "amsgrad": False},
    "adamw": {
        "learning_rate": 0.001,
        "weight_decay": 0.004,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-7,
        "amsgrad": False,
    },
    "rmsprop": {"learning_rate": 0.001, "rho": 0.9, "momentum": 0.0, "epsilon": 1e-7, "centered": False},
    "adagrad": {"learning_rate": 0.001, "initial_accumulator_value": 0.1, "epsilon": 1e-7},
}

# The float hyper-parameters each optimizer's traced step reads, in the order of the vector. The
# learning rate is always first (Keras keeps it in a float32 variable, which the step assigns).
OPTIMIZER_RUNTIME: dict[str, tuple[str, ...]] = {
    "sgd": ("learning_rate", "momentum"),
    "adam": ("learning_rate", "beta_1", "beta_2", "epsilon"),
    "adamw": ("learning_rate", "weight_decay", "beta_1", "beta_2", "epsilon"),
    "rmsprop": ("learning_rate", "rho", "momentum", "epsilon"),
    "adagrad": ("learning_rate", "epsilon"),
}
# Floats no step reads: they only set a fresh optimizer's state (Adagrad's starting accumulators).
OPTIMIZER_INITIAL: dict[str, tuple[str, ...]] = {"adagrad": ("initial_accumulator_value",)}

# Every field of a layer spec that holds a regularizer ({"l1": ..., "l2": ...} or None).
REGULARIZER_FIELDS = (
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "recurrent_regularizer",
    "embeddings_regularizer",
)


def _filled(config: Mapping[str, Any]) -> dict[str, Any]:
    return {**OPTIMIZER_DEFAULTS.get(config.get("type", ""), {}), **config}


def optimizer_structure(config: Mapping[str, Any]) -> dict[str, Any]:
    """What of an optimizer config shapes the step: its type, boolean options and slot layout.

    Every field not fed at run time stays (type, nesterov, amsgrad, centered, anything unknown).
    A momentum slot exists only for a non-zero momentum (Keras' SGD and RMSprop test it in Python,
    in ``build`` and ``update_step``), so that test is part of the structure too.
    """
    full = _filled(config)
    kind = full.get("type", "")
    fed = {*OPTIMIZER_RUNTIME.get(kind, ()), *OPTIMIZER_INITIAL.get(kind, ())}
    out = {k: v for k, v in full.items() if k not in fed}
    if kind == "sgd":
        out["momentum_slots"] = full["momentum"] != 0
    elif kind == "rmsprop":
        out["momentum_slots"] = full["momentum"] > 0
    return out


def optimizer_values(config: Mapping[str, Any]) -> list[float]:
    """The optimizer's run-time hyper-parameters, in ``OPTIMIZER_RUNTIME`` order."""
    full = _filled(config)
    return [full[name] for name in OPTIMIZER_RUNTIME.get(full.get("type", ""), ())]


def clip_kind(clip: Mapping[str, float] | None) -> str | None:
    """Which clipping applies (the same precedence as ``keras_build.apply_clip``); None: none."""
    if not clip:
        return None
    if "value" in clip:
        return "value"
    if "norm" in clip:
        return "norm"
    return "global_norm"


def clip_values(clip: Mapping[str, float] | None) -> list[float]:
    kind = clip_kind(clip)
    return [] if kind is None or clip is None else [clip[kind]]


def regularizer_kind(spec: Any) -> str | None:
    """The Keras regularizer an {"l1", "l2"} spec becomes: "l1", "l2", "l1l2", or None for none."""
    if not spec:
        return None
    l1, l2 = spec.get("l1", 0.0), spec.get("l2", 0.0)
    if l1 and l2:
        return "l1l2"
    return "l1" if l1 else "l2"


def regularizer_slots(spec: Mapping[str, Any]) -> list[tuple[int, str]]:
    """(layer index, field) of every regularizer of a model spec, in the order of the vector."""
    slots: list[tuple[int, str]] = []
    for i, layer in enumerate(spec.get("layers") or ()):
        if isinstance(layer, Mapping):
            slots.extend((i, f) for f in REGULARIZER_FIELDS if isinstance(layer.get(f), Mapping) and layer[f])
    return slots


def regularizer_values(spec: Mapping[str, Any]) -> list[float]:
    """l1, l2 of every regularizer in ``regularizer_slots`` order (two numbers each, 0 if absent)."""
    layers = spec.get("layers") or ()
    out: list[float] = []
    for i, field in regularizer_slots(spec):
        penalty = layers[i][field]
        out += [penalty.get("l1", 0.0), penalty.get("l2", 0.0)]
    return out


def model_structure(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    """The spec with every regularizer's strengths replaced by its kind (the spec itself if it has none)."""
    slots = regularizer_slots(spec)
    if not slots:
        return spec
    layers = [dict(layer) if isinstance(layer, Mapping) else layer for layer in spec["layers"]]
    for i, field in slots:
        layers[i][field] = regularizer_kind(layers[i][field])
    return {**spec, "layers": layers}
