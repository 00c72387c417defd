"""The TF-free layout equals what Keras builds: every layer type, every optimizer's state, the limits."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest

from service.api.model_schemas import DescribeRequest, ModelSpec
from service.errors import InvalidRequest, LimitExceeded, ShapeError
from service.limits import Limits
from service.models import keras_build as kb
from service.models.layout import LAYER_DEFAULTS, LAYER_TYPES, model_layout, optimizer_state_layout

# One spec per layer type (several for the shape-changing ones), each with the input it needs.
CASES: dict[str, dict[str, Any]] = {
    "dense": {"input_shape": [5], "layers": [{"type": "dense", "units": 3}]},
    "dense_3d_no_bias": {"input_shape": [4, 5], "layers": [{"type": "dense", "units": 2, "use_bias": False}]},
    "conv1d": {
        "input_shape": [9, 2],
        "layers": [{"type": "conv1d", "filters": 4, "kernel_size": 3, "strides": 2}],
    },
    "conv1d_same": {
        "input_shape": [9, 2],
        "layers": [{"type": "conv1d", "filters": 4, "kernel_size": 4, "strides": 2, "padding": "same"}],
    },
    "conv2d": {"input_shape": [7, 6, 2], "layers": [{"type": "conv2d", "filters": 3, "kernel_size": [3, 2]}]},
    "conv2d_same_strided": {
        "input_shape": [7, 6, 2],
        "layers": [{"type": "conv2d", "filters": 3, "kernel_size": 3, "strides": [2, 3], "padding": "same"}],
    },
    "max_pool2d": {"input_shape": [7, 6, 2], "layers": [{"type": "max_pool2d"}]},
    "avg_pool2d": {
        "input_shape": [7, 6, 2],
        "layers": [{"type": "avg_pool2d", "pool_size": [3, 2], "strides": 1, "padding": "same"}],
    },
    "flatten": {"input_shape": [3, 4], "layers": [{"type": "flatten"}, {"type": "dense", "units": 2}]},
    "dropout": {"input_shape": [4], "layers": [{"type": "dropout", "rate": 0.2}]},
    "batch_norm": {"input_shape": [3, 4], "layers": [{"type": "batch_norm"}]},
    "layer_norm": {"input_shape": [3, 4], "layers": [{"type": "layer_norm"}]},
    "embedding": {
        "input_shape": [6],
        "layers": [{"type": "embedding", "input_dim": 10, "output_dim": 3}, {"type": "flatten"}],
    },
    "simple_rnn": {"input_shape": [5, 3], "layers": [{"type": "simple_rnn", "units": 4}]},
    "lstm": {"input_shape": [5, 3], "layers": [{"type": "lstm", "units": 4, "return_sequences": True}]},
    "gru": {"input_shape": [5, 3], "layers": [{"type": "gru", "units": 4}]},
    "gru_no_bias": {"input_shape": [5, 3], "layers": [{"type": "gru", "units": 2, "use_bias": False}]},
    "mixed": {
        "input_shape": [8, 8, 1],
        "layers": [
            {"type": "conv2d", "filters": 2, "kernel_size": 3, "activation": "relu"},
            {"type": "batch_norm"},
            {"type": "max_pool2d"},
            {"type": "flatten"},
            {"type": "dropout", "rate": 0.1},
            {"type": "dense", "units": 3, "kernel_regularizer": {"l2": 0.1}},
            {"type": "layer_norm"},
        ],
    },
}


def _spec(raw: dict[str, Any]) -> dict[str, Any]:
    """As the API hands it to the engine: validated by the wire schema and dumped with every default."""
    return ModelSpec.model_validate(raw).model_dump()


def test_every_layer_type_is_covered() -> None:
    covered = {layer["type"] for case in CASES.values() for layer in case["layers"]}
    assert covered == set(LAYER_TYPES)


@pytest.mark.parametrize("name", list(CASES))
def test_layout_equals_what_keras_builds(name: str) -> None:
    spec = _spec(CASES[name])
    layout = model_layout(spec)
    model = kb.build_model(spec, "float32")
    trainable_ids = {id(v) for v in model.trainable_weights}
    built = [(tuple(v.shape), id(v) in trainable_ids) for v in model.weights]
    assert [(w.shape, w.trainable) for w in layout.weights] == built
    assert [tuple(a.shape) for a in model.get_weights()] == [w.shape for w in layout.weights]
    assert layout.param_count == model.count_params()
    assert layout.trainable_count == sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    keras_shapes = [tuple(layer.output.shape[1:]) for layer in layers]
    assert list(layout.output_shapes) == keras_shapes
    # The layer index in each name is the layer that owns the weight.
    owners = [int(w.name.split("[")[1].split("]")[0]) for w in layout.weights]
    assert owners == sorted(owners)


def test_schema_defaults_equal_the_layout_defaults() -> None:
    """The wire schema and the engine complete a spec the same way."""
    minimal = {
        "dense": {"units": 1},
        "conv1d": {"filters": 1, "kernel_size": 1},
        "conv2d": {"filters": 1, "kernel_size": 1},
        "embedding": {"input_dim": 2, "output_dim": 1},
        "simple_rnn": {"units": 1},
        "lstm": {"units": 1},
        "gru": {"units": 1},
    }
    for kind, defaults in LAYER_DEFAULTS.items():
        layer = {"type": kind, **minimal.get(kind, {})}
        dumped = ModelSpec.model_validate({"input_shape": [1], "layers": [layer]}).model_dump()["layers"][0]
        assert dumped == {**layer, **defaults}, kind


OPTIMIZERS: list[dict[str, Any]] = [
    {"type": "sgd"},
    {"type": "sgd", "momentum": 0.9, "nesterov": True},
    {"type": "adam"},
    {"type": "adam", "amsgrad": True},
    {"type": "adamw"},
    {"type": "rmsprop"},
    {"type": "rmsprop", "momentum": 0.5, "centered": True},
    {"type": "adagrad"},
]


@pytest.mark.parametrize("raw", OPTIMIZERS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_optimizer_state_layout_equals_keras(raw: dict[str, Any]) -> None:
    spec = _spec(CASES["mixed"])
    request = DescribeRequest.model_validate({"model": CASES["mixed"], "optimizer": raw})
    assert request.optimizer is not None
    config = request.optimizer.model_dump()
    layout = model_layout(spec)
    model = kb.build_model(spec, "float32")
    optimizer = kb.make_optimizer(config)
    optimizer.build(model.trainable_variables)
    state = kb.optimizer_state_variables(optimizer)
    expected = optimizer_state_layout(config, layout)
    assert [tuple(v.shape) for v in state] == [s.shape for s in expected]
    # Keras names slots "<optimizer>/<layer>_<weight>_<slot>": the slot names must agree too.
    assert state[0].path.endswith("iteration")
    for var, info in zip(state[1:], expected[1:], strict=True):
        assert var.path.endswith(info.name.rsplit("/", 1)[1]), (var.path, info.name)


def test_seeded_initial_weights_are_deterministic_and_seed_dependent() -> None:
    spec = _spec(CASES["mixed"])
    a = kb.initial_weights(kb.build_model(spec, "float32"))
    b = kb.initial_weights(kb.build_model(spec, "float32"))
    c = kb.initial_weights(kb.build_model({**spec, "seed": 7}, "float32"))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(
    ("raw", "limits", "error", "field"),
    [
        ({"input_shape": [10], "layers": [{"type": "dense", "units": 1000}]}, Limits(max_params=5000),
         LimitExceeded, "model.layers[0]"),
        ({"input_shape": [4], "layers": [{"type": "dense", "units": 2}] * 3}, Limits(max_layers=2),
         LimitExceeded, "model.layers"),
        ({"input_shape": [4], "layers": [{"type": "conv2d", "filters": 1, "kernel_size": 2}]}, Limits(),
         ShapeError, "model.layers[0]"),
        ({"input_shape": [3, 3, 1], "layers": [{"type": "conv2d", "filters": 1, "kernel_size": 4}]}, Limits(),
         ShapeError, "model.layers[0].kernel_size"),
        ({"input_shape": [4], "layers": [{"type": "dense", "units": 2}, {"type": "embedding", "input_dim": 3,
          "output_dim": 2}]}, Limits(), InvalidRequest, "model.layers[1].type"),
        ({"input_shape": [4], "layers": [{"type": "dense", "units": -2}]}, Limits(), InvalidRequest,
         "model.layers[0].units"),
        ({"input_shape": [4], "layers": [{"type": "lambda"}]}, Limits(), InvalidRequest,
         "model.layers[0].type"),
        ({"input_shape": [4], "layers": [{"type": "dense", "units": 2, "code": "x"}]}, Limits(),
         InvalidRequest,
         "model.layers[0].code"),
    ],
)  # fmt: skip
def test_bad_specs_name_their_field(
    raw: dict[str, Any], limits: Limits, error: type[Exception], field: str
) -> None:
    """The TF-free check refuses these before any model is built (plain dicts, as a job could carry)."""
    with pytest.raises(error) as info:
        model_layout(raw, limits)
    assert getattr(info.value, "extra", {}).get("field") == field, info.value


def test_keras_is_only_imported_here_for_the_reference() -> None:
    # service.models.layout must stay TF-free: the API imports it.
    import subprocess
    import sys

    code = (
        "import sys, service.models.layout; "
        "print(any(m.startswith(('tensorflow', 'keras')) for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert keras.__version__.startswith("3")
