"""Model gradients and training steps against independent references: in-process Keras loops,
float64 central finite differences, and hand computations in numpy."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from service.api.model_schemas import ModelSpec, TrainStepRequest
from service.engine import execute
from service.jobs import ExpressionStepJob, ModelGradientJob, TrainStepJob, TrainStepResult
from tests.tolerances import (
    CLOSED_FORM,
    DERIVED_CHAIN,
    EXACT,
    FINITE_DIFFERENCE,
    FLOAT32_CLOSED_FORM,
    KERAS_FLOAT32,
    KERAS_FLOAT32_FORWARD,
    Tolerance,
    approx,
    assert_close,
)

SPEC = ModelSpec.model_validate(
    {
        "input_shape": [4],
        "seed": 3,
        "layers": [
            {"type": "dense", "units": 5, "activation": "tanh", "kernel_regularizer": {"l2": 0.01}},
            {"type": "dense", "units": 2, "bias_regularizer": {"l1": 0.02}},
        ],
    }
).model_dump()
RNG = np.random.default_rng(42)
X = RNG.normal(size=(6, 4)).astype(np.float32)
Y = RNG.normal(size=(6, 2)).astype(np.float32)
MSE = {"type": "mse", "from_logits": False, "delta": 1.0}


def reference_model(weights: list[np.ndarray], dtype: str = "float32") -> keras.Model:
    """The same network written by hand with Keras (not through our builder)."""
    model = keras.Sequential(
        [
            keras.Input((4,), dtype=dtype),
            keras.layers.Dense(
                5, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.01), dtype=dtype
            ),
            keras.layers.Dense(2, bias_regularizer=keras.regularizers.L1(0.02), dtype=dtype),
        ]
    )
    model.set_weights(weights)
    return model


def initial_weights() -> list[np.ndarray]:
    result = execute(ModelGradientJob(SPEC, X, Y, None, MSE))
    assert result.weights is not None
    return result.weights


def optimizer_config(raw: dict[str, Any]) -> dict[str, Any]:
    request = TrainStepRequest.model_validate({"model": {"input_shape": [1], "layers": [{"type": "flatten"}]},
                                               "x": [[0.0]], "optimizer": raw})  # fmt: skip
    return request.optimizer.model_dump()


OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"type": "sgd", "learning_rate": 0.1},
    "sgd_momentum": {"type": "sgd", "learning_rate": 0.1, "momentum": 0.9},
    "sgd_nesterov": {"type": "sgd", "learning_rate": 0.1, "momentum": 0.8, "nesterov": True},
    "adam": {"type": "adam", "learning_rate": 0.05},
    "adamw": {"type": "adamw", "learning_rate": 0.05, "weight_decay": 0.1},
    "rmsprop": {"type": "rmsprop", "learning_rate": 0.01, "momentum": 0.5, "centered": True},
    "adagrad": {"type": "adagrad", "learning_rate": 0.1},
}
# Small thresholds so that clipping is active at these gradients (checked in the test).
CLIPS: dict[str, dict[str, float] | None] = {
    "none": None,
    "value": {"value": 0.05},
    "norm": {"norm": 0.1},
    "global_norm": {"global_norm": 0.2},
}
KERAS_CLIP = {
    "none": {},
    "value": {"clipvalue": 0.05},
    "norm": {"clipnorm": 0.1},
    "global_norm": {"global_clipnorm": 0.2},
}
STEPS = 3


def keras_loop(
    weights: list[np.ndarray], raw: dict[str, Any], clip: str, steps: int
) -> tuple[list[np.ndarray], list[float]]:
    """The custom training loop of the Keras guide, with Keras' own clipping options."""
    model = reference_model(weights)
    args = {k: v for k, v in raw.items() if k != "type"} | KERAS_CLIP[clip]
    cls = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW,
           "rmsprop": keras.optimizers.RMSprop, "adagrad": keras.optimizers.Adagrad}[raw["type"]]  # fmt: skip
    optimizer = cls(**args)
    loss_fn = keras.losses.MeanSquaredError()
    losses = []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = loss_fn(Y, model(X, training=True)) + tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        losses.append(float(loss))
    return [np.asarray(w) for w in model.get_weights()], losses


def close(a: list[np.ndarray], b: list[np.ndarray], tolerance: Tolerance, what: str = "") -> None:
    """Two lists of tensors (weights, optimizer state), tensor by tensor."""
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert_close(x, y, tolerance, f"{what} tensor {i}")


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_k_single_steps_equal_one_k_step_call_equal_keras(name: str, clip: str) -> None:
    raw = OPTIMIZERS[name]
    config = optimizer_config(raw)
    w0 = initial_weights()

    def job(weights: list[np.ndarray], state: list[np.ndarray] | None, steps: int) -> TrainStepResult:
        result = execute(TrainStepJob(SPEC, X, Y, weights, config, state, MSE, clip=CLIPS[clip], steps=steps))
        assert isinstance(result, TrainStepResult)
        return result

    batched = job(w0, None, STEPS)
    weights, state = w0, None
    singles = []
    for _ in range(STEPS):
        single = job(weights, state, 1)
        weights, state = single.weights, single.optimizer_state
        singles.append(single.history[0])
    # Stateless and exact: feeding back weights and state is the same computation, bit for bit.
    close(weights, batched.weights, EXACT, "weights")
    close(state or [], batched.optimizer_state, EXACT, "optimizer state")
    assert [h.loss for h in singles] == [h.loss for h in batched.history]
    assert float(batched.optimizer_state[0]) == STEPS

    expected, losses = keras_loop(w0, raw, clip, STEPS)
    close(batched.weights, expected, KERAS_FLOAT32, f"{name} vs Keras: weights")
    assert_close([h.loss for h in batched.history], losses, KERAS_FLOAT32, f"{name} vs Keras: losses")
    first = batched.history[0]
    if clip == "none":  # the same norm of the same (unclipped) gradients
        assert first.clipped_gradient_norm == approx(first.gradient_norm, EXACT)
    else:
        assert first.clipped_gradient_norm < first.gradient_norm  # the thresholds above do clip


def test_regularization_loss_is_the_sum_of_model_losses() -> None:
    w = initial_weights()
    result = execute(ModelGradientJob(SPEC, X, Y, w, MSE))
    by_hand = 0.01 * np.sum(w[0].astype(np.float64) ** 2) + 0.02 * np.sum(np.abs(w[3].astype(np.float64)))
    model = reference_model(w)
    model(X)
    assert result.regularization_loss == approx(float(tf.add_n(model.losses)), KERAS_FLOAT32_FORWARD)
    assert result.regularization_loss == approx(by_hand, FLOAT32_CLOSED_FORM)
    assert result.loss == approx(result.data_loss + result.regularization_loss, FLOAT32_CLOSED_FORM)


def _f64_loss(weights: list[np.ndarray], x: np.ndarray) -> float:
    result = execute(ModelGradientJob(SPEC, x, Y.astype(np.float64), weights, MSE, dtype="float64"))
    return result.loss


def test_weight_input_gradients_and_hvp_match_float64_finite_differences() -> None:
    # Shifted off zero: the L1 penalty on the (zero-initialized) bias has a kink there.
    w = [a.astype(np.float64) + 0.1 * RNG.normal(size=a.shape) for a in initial_weights()]
    x = X.astype(np.float64)
    tangents = [RNG.normal(size=a.shape) for a in w]
    result = execute(
        ModelGradientJob(
            SPEC,
            x,
            Y.astype(np.float64),
            w,
            MSE,
            wrt=("weights", "inputs"),
            tangents=tangents,
            saliency=True,
            dtype="float64",
        )  # fmt: skip
    )
    assert result.weight_gradients is not None and result.input_gradients is not None
    h = 1e-6
    for i in (0, 3):
        for idx in [(0,) * w[i].ndim, tuple(s - 1 for s in w[i].shape)]:
            plus = [a.copy() for a in w]
            minus = [a.copy() for a in w]
            plus[i][idx] += h
            minus[i][idx] -= h
            fd = (_f64_loss(plus, x) - _f64_loss(minus, x)) / (2 * h)
            assert result.weight_gradients[i][idx] == approx(fd, FINITE_DIFFERENCE)
    for idx in [(0, 0), (5, 3), (2, 1)]:
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        fd = (_f64_loss(w, xp) - _f64_loss(w, xm)) / (2 * h)
        assert result.input_gradients[idx] == approx(fd, FINITE_DIFFERENCE)
    # Saliency: each example's own loss; the batch loss is their mean, so saliency = n * input gradient.
    assert result.saliency is not None
    assert_close(result.saliency, 6 * result.input_gradients, DERIVED_CHAIN, "saliency")
    # HVP: directional derivative of the weight gradient along the tangents.
    eps = 1e-5

    def grads_at(sign: float) -> list[np.ndarray]:
        moved = [a + sign * eps * t for a, t in zip(w, tangents, strict=True)]
        r = execute(ModelGradientJob(SPEC, x, Y.astype(np.float64), moved, MSE, dtype="float64"))
        assert r.weight_gradients is not None
        return r.weight_gradients

    gp, gm = grads_at(1.0), grads_at(-1.0)
    assert result.hvp is not None
    for i, (hv, a, b) in enumerate(zip(result.hvp, gp, gm, strict=True)):
        assert_close(hv, (a - b) / (2 * eps), FINITE_DIFFERENCE, f"hvp of weight {i}")


def test_fgsm_is_x_plus_eps_sign_of_the_input_gradient_and_increases_the_loss() -> None:
    w = initial_weights()
    eps = 0.1
    result = execute(ModelGradientJob(SPEC, X, Y, w, MSE, adversarial={"method": "fgsm", "epsilon": eps}))
    model = reference_model(w)
    xt = tf.constant(X)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = keras.losses.MeanSquaredError()(Y, model(xt))
    grad = tape.gradient(loss, xt).numpy()
    assert_close(result.x_adv, X + eps * np.sign(grad), EXACT, "x_adv")
    assert result.adversarial_loss is not None and result.adversarial_loss > result.data_loss


def test_pgd_stays_in_the_epsilon_ball_and_beats_fgsm() -> None:
    w = initial_weights()
    eps = 0.1
    fgsm = execute(ModelGradientJob(SPEC, X, Y, w, MSE, adversarial={"method": "fgsm", "epsilon": eps}))
    pgd = execute(
        ModelGradientJob(
            SPEC, X, Y, w, MSE, adversarial={"method": "pgd", "epsilon": eps, "steps": 20, "step_size": 0.02}
        )  # fmt: skip
    )
    assert pgd.x_adv is not None
    assert np.max(np.abs(pgd.x_adv - X)) <= eps + 1e-6
    assert pgd.adversarial_loss is not None and fgsm.adversarial_loss is not None
    assert pgd.adversarial_loss >= fgsm.adversarial_loss - 1e-6


def test_adversarial_training_loss_mixes_clean_and_fgsm_losses() -> None:
    w = initial_weights()
    config = optimizer_config({"type": "sgd"})
    ratio = 0.3
    step = execute(
        TrainStepJob(
            SPEC,
            X,
            Y,
            w,
            config,
            None,
            MSE,
            objective={"type": "adversarial", "epsilon": 0.1, "ratio": ratio},
        )
    )
    attack = execute(ModelGradientJob(SPEC, X, Y, w, MSE, adversarial={"method": "fgsm", "epsilon": 0.1}))
    assert isinstance(step, TrainStepResult) and attack.adversarial_loss is not None
    expected = (1 - ratio) * attack.data_loss + ratio * attack.adversarial_loss
    assert step.history[0].data_loss == approx(expected, FLOAT32_CLOSED_FORM)


@pytest.mark.parametrize(("baseline", "beta"), [(None, 0.0), ("mean", 0.1), (0.5, 0.0)])
def test_reinforce_gradient_matches_a_hand_computation(baseline: Any, beta: float) -> None:
    spec = ModelSpec.model_validate(
        {"input_shape": [3], "layers": [{"type": "dense", "units": 4, "use_bias": False}]}
    ).model_dump()
    states = RNG.normal(size=(5, 3))
    actions = np.array([0, 3, 1, 1, 2])
    returns = np.array([1.0, -0.5, 2.0, 0.3, -1.2])
    weights = [RNG.normal(size=(3, 4)) * 0.5]
    objective = {"type": "reinforce", "baseline": baseline, "entropy_coefficient": beta, "from_logits": True}
    result = execute(
        TrainStepJob(
            spec,
            states,
            None,
            weights,
            optimizer_config({"type": "sgd"}),
            None,
            MSE,
            objective=objective,
            actions=actions.astype(float),
            returns=returns,
            return_gradients=True,
            dtype="float64",
        )  # fmt: skip
    )
    assert isinstance(result, TrainStepResult) and result.gradients is not None
    # By hand: z = s W, p = softmax(z); d(-log p_a)/dz = p - onehot(a); dH/dz = -p (log p + H).
    z = states @ weights[0]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    b = returns.mean() if baseline == "mean" else (baseline or 0.0)
    advantage = returns - b
    onehot = np.eye(4)[actions]
    entropy = -(p * np.log(p)).sum(axis=1)
    n = len(actions)
    dz = (p - onehot) * advantage[:, None] / n + beta * p * (np.log(p) + entropy[:, None]) / n
    loss = -np.mean(np.log(p[np.arange(n), actions]) * advantage) - beta * entropy.mean()
    assert_close(result.gradients[0], states.T @ dz, DERIVED_CHAIN, "gradient")
    assert result.history[0].loss == approx(loss, CLOSED_FORM)


def test_dropout_and_batch_norm_steps_are_repeatable_and_update_moving_statistics() -> None:
    spec = ModelSpec.model_validate(
        {
            "input_shape": [4],
            "layers": [
                {"type": "dense", "units": 8},
                {"type": "dropout", "rate": 0.5},
                {"type": "batch_norm"},
                {"type": "dense", "units": 2},
            ],
        }  # fmt: skip
    ).model_dump()
    config = optimizer_config({"type": "adam", "learning_rate": 0.01})
    batched = execute(TrainStepJob(spec, X, Y, None, config, None, MSE, steps=3))
    assert isinstance(batched, TrainStepResult)
    weights, state = None, None
    for _ in range(3):
        single = execute(TrainStepJob(spec, X, Y, weights, config, state, MSE))
        assert isinstance(single, TrainStepResult)
        weights, state = single.weights, single.optimizer_state
    assert weights is not None
    close(weights, batched.weights, EXACT, "weights")
    assert not np.allclose(batched.weights[4], 0.0)  # moving_mean moved away from its zero start


def rosenbrock_tf(x: Any) -> Any:
    return tf.reduce_sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)


@pytest.mark.parametrize("clip", ["none", "global_norm"])
def test_expression_steps_equal_a_keras_loop_and_are_stateless(clip: str) -> None:
    raw = {"type": "adam", "learning_rate": 0.05}
    config = optimizer_config(raw)
    x0 = np.array([-1.0, 1.5, 0.5], np.float32)
    rosen = "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)"
    batched = execute(ExpressionStepJob(rosen, {"x": x0}, optimizer=config, clip=CLIPS[clip], steps=5))
    variables, state = {"x": x0}, None
    for _ in range(5):
        single = execute(
            ExpressionStepJob(rosen, variables, optimizer=config, optimizer_state=state, clip=CLIPS[clip])
        )
        variables, state = single.variables, single.optimizer_state
    assert_close(variables["x"], batched.variables["x"], EXACT, "x")

    var = keras.Variable(x0)
    optimizer = keras.optimizers.Adam(learning_rate=0.05, **KERAS_CLIP[clip])
    for _ in range(5):
        with tf.GradientTape() as tape:
            value = rosenbrock_tf(var.value)
        optimizer.apply_gradients([(tape.gradient(value, var.value), var)])
    assert_close(batched.variables["x"], var.numpy(), KERAS_FLOAT32, "x vs Keras")
    assert batched.history[0].loss == approx(float(rosenbrock_tf(tf.constant(x0))), KERAS_FLOAT32_FORWARD)
