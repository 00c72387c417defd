"""Recurrent layers' model gradients (weights, inputs, saliency, HVP) against in-process Keras, float64.

The engine traces a model gradient with a second tape only when an HVP is asked for and a
persistent inner tape only when it takes more than one gradient; every combination must give
Keras' own derivatives.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from service.api.model_schemas import ModelSpec
from service.engine import execute
from service.jobs import ModelGradientJob
from tests.tolerances import DERIVED_CHAIN, assert_close

MSE = {"type": "mse", "from_logits": False, "delta": 1.0}
RNG = np.random.default_rng(7)
X = RNG.normal(size=(4, 5, 3))
Y = RNG.normal(size=(4, 2))
LAYERS = {"simple_rnn": keras.layers.SimpleRNN, "lstm": keras.layers.LSTM, "gru": keras.layers.GRU}


def spec(kind: str) -> dict[str, Any]:
    raw = {
        "input_shape": [5, 3],
        "seed": 1,
        "layers": [{"type": kind, "units": 4}, {"type": "dense", "units": 2}],
    }
    return ModelSpec.model_validate(raw).model_dump()


def keras_reference(kind: str, weights: list[np.ndarray]) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((5, 3), dtype="float64"),
            LAYERS[kind](4, dtype="float64"),
            keras.layers.Dense(2, dtype="float64"),
        ]
    )
    model.set_weights(weights)
    return model


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_weight_gradients_alone_match_keras(kind: str) -> None:
    fresh = execute(ModelGradientJob(spec(kind), X, Y, None, MSE, dtype="float64"))
    assert fresh.weights is not None and fresh.weight_gradients is not None
    model = keras_reference(kind, fresh.weights)
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError(dtype="float64")(Y, model(X))
    expected = tape.gradient(loss, model.trainable_weights)
    assert fresh.loss == pytest.approx(float(loss), rel=DERIVED_CHAIN.rtol)
    for i, (got, want) in enumerate(zip(fresh.weight_gradients, expected, strict=True)):
        assert_close(got, want.numpy(), DERIVED_CHAIN.scaled(want.numpy()), f"{kind} gradient of weight {i}")


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_input_gradients_saliency_and_hvp_match_keras(kind: str) -> None:
    weights = execute(ModelGradientJob(spec(kind), X, Y, None, MSE, dtype="float64")).weights
    assert weights is not None
    weights = [w + 0.1 * RNG.normal(size=w.shape) for w in weights]
    tangents = [RNG.normal(size=w.shape) for w in weights]
    result = execute(
        ModelGradientJob(
            spec(kind),
            X,
            Y,
            weights,
            MSE,
            wrt=("weights", "inputs"),
            tangents=tangents,
            saliency=True,
            dtype="float64",
        )  # fmt: skip
    )
    model = keras_reference(kind, weights)
    x = tf.constant(X)
    with tf.GradientTape() as outer:
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            out = model(x)
            loss = keras.losses.MeanSquaredError(dtype="float64")(Y, out)
            per_example = tf.reduce_sum(
                keras.losses.MeanSquaredError(reduction=None, dtype="float64")(Y, out)
            )
        grads = tape.gradient(loss, model.trainable_weights)
    hvp = outer.gradient(grads, model.trainable_weights, output_gradients=[tf.constant(t) for t in tangents])
    assert result.weight_gradients is not None and result.hvp is not None
    for i, (got, want) in enumerate(zip(result.weight_gradients, grads, strict=True)):
        assert_close(got, want.numpy(), DERIVED_CHAIN.scaled(want.numpy()), f"{kind} gradient of weight {i}")
    for i, (got, want) in enumerate(zip(result.hvp, hvp, strict=True)):
        assert_close(got, want.numpy(), DERIVED_CHAIN.scaled(want.numpy()), f"{kind} hvp of weight {i}")
    input_grad = tape.gradient(loss, x).numpy()
    saliency = tape.gradient(per_example, x).numpy()
    assert_close(
        result.input_gradients, input_grad, DERIVED_CHAIN.scaled(input_grad), f"{kind} input gradient"
    )
    assert_close(result.saliency, saliency, DERIVED_CHAIN.scaled(saliency), f"{kind} saliency")
