"""Hyper-parameters are inputs of the compiled step, not part of its cache key.

A schedule (learning rate, momentum, betas, clip threshold, L2 strength changing every step) runs
as single-step jobs that pass back weights and optimizer state: the first compiles ("miss"), every
later one runs from the cache ("hit"), and the result equals in-process Keras with the same
schedule (its attributes set before each step) or a closed form. What does change the program
(optimizer type and options, a momentum slot, clip kind, regularizer kind) still changes the key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from service.api.model_schemas import ModelSpec, TrainStepRequest
from service.engine import execute
from service.errors import InvalidRequest
from service.jobs import (
    ExpressionStepJob,
    ExpressionStepResult,
    ModelGradientJob,
    ModelGradientResult,
    TrainStepJob,
    TrainStepResult,
)
from service.jobs.hyperparameters import OPTIMIZER_DEFAULTS, OPTIMIZER_INITIAL, OPTIMIZER_RUNTIME
from tests.tolerances import (
    CLOSED_FORM,
    EXACT,
    FLOAT32_CLOSED_FORM,
    FLOAT32_LEARNING_RATE,
    KERAS_FLOAT32,
    approx,
    assert_close,
)

MSE = {"type": "mse", "from_logits": False, "delta": 1.0}
RNG = np.random.default_rng(2024)
X = RNG.normal(size=(6, 4)).astype(np.float32)
Y = RNG.normal(size=(6, 2)).astype(np.float32)
# A well-conditioned network: tanh, no BatchNorm, every parameter with a non-zero gradient (so
# Adam does not turn rounding noise into a step; see tests/tolerances.py, KERAS_FLOAT32).
WEIGHTS = [
    RNG.normal(scale=0.5, size=(4, 8)).astype(np.float32),
    RNG.normal(scale=0.1, size=(8,)).astype(np.float32),
    RNG.normal(scale=0.5, size=(8, 2)).astype(np.float32),
    RNG.normal(scale=0.1, size=(2,)).astype(np.float32),
]
STEPS = 20


def spec(seed: int, l2: float | None = None) -> dict[str, Any]:
    """The network; a distinct seed per test, so that its first job compiles (a cache miss)."""
    first: dict[str, Any] = {"type": "dense", "units": 8, "activation": "tanh"}
    if l2 is not None:
        first["kernel_regularizer"] = {"l2": l2}
    raw = {"input_shape": [4], "seed": seed, "layers": [first, {"type": "dense", "units": 2}]}
    return ModelSpec.model_validate(raw).model_dump()


def optimizer(raw: dict[str, Any]) -> dict[str, Any]:
    """Through the wire schema, so every default is filled in as the API fills it."""
    request = TrainStepRequest.model_validate({"model": spec(0), "x": [[0.0] * 4], "optimizer": raw})
    return request.optimizer.model_dump()


def keras_model(weights: list[np.ndarray], l2: keras.regularizers.L2 | None = None) -> keras.Model:
    """The same network written by hand with Keras (not through our builder)."""
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh", kernel_regularizer=l2),
            keras.layers.Dense(2),
        ]
    )
    model.set_weights(weights)
    return model


Trained = tuple[list[np.ndarray], list[np.ndarray], list[float]]  # weights, optimizer state, losses


def keras_schedule(
    make: Callable[[], keras.optimizers.Optimizer],
    settings: list[dict[str, float]],
    l2: keras.regularizers.L2 | None = None,
) -> Trained:
    """The Keras guide's training loop, each step's settings assigned first (``l2`` to the regularizer)."""
    model = keras_model(WEIGHTS, l2)
    opt = make()
    loss_fn = keras.losses.MeanSquaredError()
    losses = []
    for setting in settings:
        for name, value in setting.items():
            setattr(l2 if name == "l2" else opt, name, value)
        with tf.GradientTape() as tape:
            loss = loss_fn(Y, model(X, training=True))
            if model.losses:
                loss = loss + tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        losses.append(float(loss))
    # The documented state order: the iteration count, then the slots; the learning rate is not state.
    state = [np.asarray(v.numpy(), np.float32) for v in opt.variables if "learning_rate" not in v.path]
    return [np.asarray(w) for w in model.get_weights()], state, losses


def engine_schedule(jobs: list[Callable[[Any, Any], TrainStepJob]]) -> tuple[Trained, list[TrainStepResult]]:
    """Single-step jobs, each given the weights and optimizer state the previous one returned."""
    weights: Any = WEIGHTS
    state: Any = None
    results = []
    for make in jobs:
        result = execute(make(weights, state))
        assert isinstance(result, TrainStepResult)
        weights, state = result.weights, result.optimizer_state
        results.append(result)
    return (weights, state, [r.history[0].loss for r in results]), results


def assert_compiled_once(results: list[Any]) -> None:
    assert [r.cache for r in results] == ["miss"] + ["hit"] * (len(results) - 1)


def assert_equal_to_keras(engine: Trained, reference: Trained, what: str) -> None:
    for i, (a, b) in enumerate(zip(engine[0], reference[0], strict=True)):
        assert_close(a, b, KERAS_FLOAT32, f"{what}: weight {i}")
    assert len(engine[1]) == len(reference[1])
    for i, (a, b) in enumerate(zip(engine[1], reference[1], strict=True)):
        assert_close(a, b, KERAS_FLOAT32, f"{what}: optimizer state {i}")
    assert_close(engine[2], reference[2], KERAS_FLOAT32, f"{what}: losses")


# A decaying, wobbling schedule: 20 distinct learning rates.
LEARNING_RATES = [0.05 * 0.9**k * (1.0 + 0.1 * (k % 3)) for k in range(STEPS)]


def test_a_learning_rate_schedule_compiles_once_and_equals_keras() -> None:
    model = spec(101)
    configs = [optimizer({"type": "adam", "learning_rate": lr}) for lr in LEARNING_RATES]
    assert len({TrainStepJob(model, X, Y, None, c, None, MSE).signature() for c in configs}) == 1
    engine, results = engine_schedule(
        [lambda w, s, c=c: TrainStepJob(model, X, Y, w, c, s, MSE) for c in configs]
    )
    assert_compiled_once(results)
    reference = keras_schedule(
        lambda: keras.optimizers.Adam(learning_rate=LEARNING_RATES[0]),
        [{"learning_rate": lr} for lr in LEARNING_RATES],
    )
    assert_equal_to_keras(engine, reference, "adam, learning-rate schedule")
    assert float(engine[1][0]) == STEPS


def ramp(first: float, last: float) -> list[float]:
    """STEPS values from first to last."""
    return [first + (last - first) * k / (STEPS - 1) for k in range(STEPS)]


def schedule(**ramps: list[float]) -> list[dict[str, float]]:
    return [{name: values[k] for name, values in ramps.items()} for k in range(STEPS)]


# Every run-time float of every optimizer (and of its structural variants) changes at every step,
# by enough to move the result beyond KERAS_FLOAT32 if a step kept its first value: epsilons of
# the order of sqrt(v), momenta never 0 (a zero momentum has no slot: another program).
SCHEDULES: dict[str, tuple[dict[str, Any], list[dict[str, float]]]] = {
    "sgd": ({"type": "sgd"}, schedule(learning_rate=ramp(0.05, 0.02), momentum=ramp(0.5, 0.95))),
    "sgd_nesterov": (
        {"type": "sgd", "nesterov": True},
        schedule(learning_rate=ramp(0.02, 0.05), momentum=ramp(0.9, 0.3)),
    ),
    "adam": (
        {"type": "adam"},
        schedule(
            learning_rate=ramp(0.02, 0.01),
            beta_1=ramp(0.8, 0.99),
            beta_2=ramp(0.99, 0.9976),
            epsilon=ramp(1e-3, 2e-2),
        ),
    ),
    "adam_amsgrad": (
        {"type": "adam", "amsgrad": True},
        schedule(beta_1=ramp(0.95, 0.7), beta_2=ramp(0.9, 0.999), epsilon=ramp(1e-2, 1e-4)),
    ),
    "adamw": ({"type": "adamw", "learning_rate": 0.02}, schedule(weight_decay=ramp(0.01, 0.2))),
    "rmsprop": (
        {"type": "rmsprop"},
        schedule(learning_rate=ramp(0.01, 0.005), rho=ramp(0.8, 0.895), momentum=ramp(0.3, 0.49)),
    ),
    "rmsprop_centered": (
        {"type": "rmsprop", "centered": True, "learning_rate": 0.005},
        schedule(rho=ramp(0.95, 0.85), momentum=ramp(0.1, 0.6), epsilon=ramp(1e-3, 5e-2)),
    ),
    "adagrad": ({"type": "adagrad"}, schedule(learning_rate=ramp(0.1, 0.02), epsilon=ramp(1e-2, 0.3))),
}
KERAS_OPTIMIZERS = {
    "sgd": keras.optimizers.SGD,
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "rmsprop": keras.optimizers.RMSprop,
    "adagrad": keras.optimizers.Adagrad,
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_momentum_beta_and_epsilon_schedules_compile_once_and_equal_keras(name: str) -> None:
    fixed, settings = SCHEDULES[name]
    model = spec(200 + list(SCHEDULES).index(name))
    configs = [optimizer({**fixed, **s}) for s in settings]
    assert len({TrainStepJob(model, X, Y, None, c, None, MSE).signature() for c in configs}) == 1
    engine, results = engine_schedule(
        [lambda w, s, c=c: TrainStepJob(model, X, Y, w, c, s, MSE) for c in configs]
    )
    assert_compiled_once(results)
    cls = KERAS_OPTIMIZERS[fixed["type"]]
    options = {k: v for k, v in fixed.items() if k != "type"}
    reference = keras_schedule(lambda: cls(**options, **settings[0]), settings)
    assert_equal_to_keras(engine, reference, f"{name} schedule")


@pytest.mark.parametrize("kind", ["norm", "global_norm", "value"])
def test_a_clip_threshold_schedule_compiles_once_and_equals_keras(kind: str) -> None:
    model = spec({"norm": 106, "global_norm": 107, "value": 108}[kind])
    config = optimizer({"type": "sgd", "learning_rate": 0.1})
    # Small thresholds, growing, so that clipping is active at every step (checked below).
    thresholds = [0.02 * (1 + 0.1 * k) for k in range(STEPS)]
    engine, results = engine_schedule(
        [lambda w, s, t=t: TrainStepJob(model, X, Y, w, config, s, MSE, clip={kind: t}) for t in thresholds]
    )
    assert_compiled_once(results)
    assert all(r.history[0].clipped_gradient_norm < r.history[0].gradient_norm for r in results)
    attribute = {"norm": "clipnorm", "global_norm": "global_clipnorm", "value": "clipvalue"}[kind]
    reference = keras_schedule(
        lambda: keras.optimizers.SGD(learning_rate=0.1, **{attribute: thresholds[0]}),
        [{attribute: t} for t in thresholds],
    )
    assert_equal_to_keras(engine, reference, f"clip {kind} schedule")
    if kind == "global_norm":  # the clipped norm is the threshold itself
        for r, t in zip(results, thresholds, strict=True):
            assert r.history[0].clipped_gradient_norm == approx(t, FLOAT32_CLOSED_FORM)


def test_an_l2_strength_schedule_compiles_once_and_equals_keras_and_the_closed_form() -> None:
    strengths = [0.001 * 1.5**k for k in range(STEPS)]
    config = optimizer({"type": "sgd", "learning_rate": 0.05, "momentum": 0.9})
    engine, results = engine_schedule(
        [lambda w, s, l2=l2: TrainStepJob(spec(109, l2), X, Y, w, config, s, MSE) for l2 in strengths]
    )
    assert_compiled_once(results)
    penalty = keras.regularizers.L2(strengths[0])
    reference = keras_schedule(
        lambda: keras.optimizers.SGD(learning_rate=0.05, momentum=0.9),
        [{"l2": l2} for l2 in strengths],
        l2=penalty,
    )
    assert_equal_to_keras(engine, reference, "l2 schedule")
    # Each step's regularization loss is its own strength times the sum of squares of the kernel it got.
    kernels = [WEIGHTS[0]] + [r.weights[0] for r in results[:-1]]
    for r, l2, kernel in zip(results, strengths, kernels, strict=True):
        expected = l2 * np.sum(kernel.astype(np.float64) ** 2)
        assert r.history[0].regularization_loss == approx(expected, FLOAT32_CLOSED_FORM)


def regularized_spec(l1: float, l2: float) -> dict[str, Any]:
    """Kernel: L1L2 (both > 0), bias: L1 only, output: L2 only; the same three kinds for any l1, l2 > 0."""
    hidden = {
        "type": "dense",
        "units": 8,
        "activation": "tanh",
        "kernel_regularizer": {"l1": l1, "l2": l2},
        "bias_regularizer": {"l1": 2 * l1},
        "activity_regularizer": {"l2": l2},
    }
    raw = {"input_shape": [4], "seed": 110, "layers": [hidden, {"type": "dense", "units": 2}]}
    return ModelSpec.model_validate(raw).model_dump()


def test_model_gradients_do_not_recompile_for_other_regularization_strengths() -> None:
    w = [a.astype(np.float64) for a in WEIGHTS]
    w[1] = w[1] + 0.3  # away from 0, where L1 has its kink
    x, y = X.astype(np.float64), Y.astype(np.float64)
    n = len(x)
    hidden = np.tanh(x @ w[0] + w[1])
    plain = execute(ModelGradientJob(spec(110), x, y, w, MSE, dtype="float64"))  # no penalties
    assert isinstance(plain, ModelGradientResult) and plain.weight_gradients is not None
    caches = []
    for k in range(5):
        l1, l2 = 0.01 * (k + 1), 0.003 * (k + 2)
        result = execute(ModelGradientJob(regularized_spec(l1, l2), x, y, w, MSE, dtype="float64"))
        assert isinstance(result, ModelGradientResult) and result.weight_gradients is not None
        caches.append(result.cache)
        # Keras' regularizers cast their strength with ops.cast, which makes a Python float float32
        # first: a float64 model's penalties use the float32-rounded strengths (so does the engine).
        l1, l2, bias_l1 = f32(l1), f32(l2), f32(2 * l1)
        expected = (
            l1 * np.sum(np.abs(w[0])) + l2 * np.sum(w[0] ** 2) + bias_l1 * np.sum(np.abs(w[1]))
            + l2 * np.sum(hidden**2) / n  # Keras divides an activity penalty by the batch size
        )  # fmt: skip
        assert result.regularization_loss == approx(expected, CLOSED_FORM)
        assert result.data_loss == approx(plain.data_loss, EXACT)
        # The kernel's gradient: the data term plus this job's penalties (the activity one through tanh).
        activity = x.T @ (2 * l2 / n * hidden * (1 - hidden**2))
        kernel = plain.weight_gradients[0] + l1 * np.sign(w[0]) + 2 * l2 * w[0] + activity
        assert_close(result.weight_gradients[0], kernel, CLOSED_FORM.scaled(kernel), f"kernel gradient {k}")
        bias = (
            plain.weight_gradients[1]
            + bias_l1 * np.sign(w[1])
            + 2 * l2 / n * np.sum(hidden * (1 - hidden**2), 0)
        )
        assert_close(result.weight_gradients[1], bias, CLOSED_FORM.scaled(bias), f"bias gradient {k}")
    assert caches == ["miss"] + ["hit"] * 4


def f32(value: float) -> float:
    """A Python float as Keras' ops.cast sees it: converted to float32 first."""
    return float(np.float32(value))


def sgd_closed_form(x0: np.ndarray, rates: list[float]) -> tuple[np.ndarray, list[float]]:
    """0.5 * sum(x**2) has gradient x: each SGD step multiplies x by (1 - lr)."""
    x, values = x0.astype(np.float64), []
    for lr in rates:
        values.append(0.5 * float(np.sum(x**2)))
        x = x - lr * x
    return x, values


def adam_closed_form(x0: np.ndarray, rates: list[float]) -> tuple[np.ndarray, list[float]]:
    """Keras' Adam (beta_1 0.9, beta_2 0.999, epsilon 1e-7) in float64 on the gradient x.

    As Keras computes it: the moments use 1 - beta in float64, the bias correction beta ** t of the
    betas cast to the variable's dtype, which goes through float32.
    """
    x, values = x0.astype(np.float64), []
    m, v = np.zeros_like(x), np.zeros_like(x)
    for t, lr in enumerate(rates, start=1):
        values.append(0.5 * float(np.sum(x**2)))
        g = x
        m = m + (g - m) * (1 - 0.9)
        v = v + (g * g - v) * (1 - 0.999)
        alpha = lr * np.sqrt(1 - f32(0.999) ** t) / (1 - f32(0.9) ** t)
        x = x - m * alpha / (np.sqrt(v) + 1e-7)
    return x, values


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_an_expression_step_learning_rate_schedule_compiles_once_and_equals_the_closed_form(
    name: str,
) -> None:
    # Learning rates exact in float32 (Keras keeps the rate in a float32 variable, even in float64).
    rates = [0.5, 0.25, 0.125, 0.0625, 0.375, 0.1875, 0.03125, 0.75, 0.625, 0.4375] * 2
    # Its own expression per test, so that its first job compiles.
    expression = "sum(x**2) / 2" if name == "sgd" else "sum(x**2) * 0.5"
    x0 = np.array([1.0, -2.0, 3.0, 0.5])
    x: dict[str, np.ndarray] = {"x": x0}
    state: Any = None
    results = []
    for lr in rates:
        result = execute(
            ExpressionStepJob(
                expression,
                x,
                optimizer=optimizer({"type": name, "learning_rate": lr}),
                optimizer_state=state,
                dtype="float64",
            )  # fmt: skip
        )
        assert isinstance(result, ExpressionStepResult)
        x, state = result.variables, result.optimizer_state
        results.append(result)
    assert_compiled_once(results)
    expected, values = (sgd_closed_form if name == "sgd" else adam_closed_form)(x0, rates)
    assert_close(x["x"], expected, CLOSED_FORM.scaled(expected), f"{name}: x after the schedule")
    assert_close([r.history[0].loss for r in results], values, CLOSED_FORM, f"{name}: values")


def test_a_learning_rate_not_exact_in_float32_is_rounded_as_keras_rounds_it() -> None:
    # 0.1 is not a float32: Keras (and so the step) uses float32(0.1), in a float64 step too.
    x0 = np.array([1.0, -2.0])
    result = execute(ExpressionStepJob("sum(x**2) / 2 + 0", {"x": x0}, optimizer=optimizer({"type": "sgd",
                                       "learning_rate": 0.1}), dtype="float64"))  # fmt: skip
    assert isinstance(result, ExpressionStepResult)
    assert_close(result.variables["x"], x0 * (1 - float(np.float32(0.1))), CLOSED_FORM, "x")
    assert_close(result.variables["x"], x0 * 0.9, FLOAT32_LEARNING_RATE, "x")


def test_a_fresh_adagrad_starts_at_each_jobs_initial_accumulator_value() -> None:
    model = spec(111)
    states = []
    for start in (0.1, 0.5):
        config = optimizer({"type": "adagrad", "learning_rate": 0.1, "initial_accumulator_value": start})
        result = execute(TrainStepJob(model, X, Y, WEIGHTS, config, None, MSE))
        assert isinstance(result, TrainStepResult)
        states.append(result)
    assert [r.cache for r in states] == ["miss", "hit"]
    for result, start in zip(states, (0.1, 0.5), strict=True):
        reference = keras_schedule(
            lambda start=start: keras.optimizers.Adagrad(learning_rate=0.1, initial_accumulator_value=start),
            [{}],
        )
        assert_equal_to_keras((result.weights, result.optimizer_state, [result.history[0].loss]), reference,
                              f"adagrad from {start}")  # fmt: skip


def test_a_float64_adagrad_starts_where_keras_starts_it() -> None:
    # Keras fills the accumulators with ops.cast(value, float64): through float32, as the engine does.
    x0 = np.array([1.0, -2.0])
    results = []
    for start in (0.3, 0.7):
        config = optimizer({"type": "adagrad", "learning_rate": 0.5, "initial_accumulator_value": start})
        result = execute(ExpressionStepJob("sum(x**2) / 2 - 1", {"x": x0}, optimizer=config, dtype="float64"))
        assert isinstance(result, ExpressionStepResult)
        results.append(result)
        accumulator = f32(start) + x0**2  # the gradient of the expression is x
        assert_close(result.optimizer_state[1], accumulator, CLOSED_FORM, f"accumulator from {start}")
        assert_close(result.variables["x"], x0 - 0.5 * x0 / np.sqrt(accumulator + 1e-7), CLOSED_FORM, "x")
    assert [r.cache for r in results] == ["miss", "hit"]


# --- what stays in the key (no TensorFlow: signatures only)


def _step(model: dict[str, Any], raw: dict[str, Any], clip: dict[str, float] | None = None) -> TrainStepJob:
    return TrainStepJob(model, X, Y, None, optimizer(raw), None, MSE, clip=clip)


def test_numbers_share_a_signature_and_structure_does_not() -> None:
    base = spec(0, l2=0.01)
    same = [
        _step(base, {"type": "adam", "learning_rate": 0.001}),
        _step(base, {"type": "adam", "learning_rate": 0.3, "beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-3}),
        _step(spec(0, l2=5.0), {"type": "adam"}),
        TrainStepJob(base, X, Y, None, {"type": "adam"}, None, MSE),  # defaults not filled in
    ]
    assert len({j.signature() for j in same}) == 1
    assert [list(j.hyperparameters()) for j in same[:3]] == [
        [0.001, 0.9, 0.999, 1e-7, 0.0, 0.01],  # the optimizer's floats, then the kernel's l1, l2
        [0.3, 0.5, 0.9, 1e-3, 0.0, 0.01],
        [0.001, 0.9, 0.999, 1e-7, 0.0, 5.0],
    ]
    assert list(_step(base, {"type": "sgd"}, {"norm": 0.5}).hyperparameters()) == [0.01, 0.0, 0.5, 0.0, 0.01]
    # Every float of every optimizer is fed at run time or only seeds a fresh state.
    for kind, defaults in OPTIMIZER_DEFAULTS.items():
        floats = {k for k, v in defaults.items() if isinstance(v, float)}
        assert floats == {*OPTIMIZER_RUNTIME[kind], *OPTIMIZER_INITIAL.get(kind, ())}, kind

    different = [
        _step(base, {"type": "adam"}),
        _step(base, {"type": "adam", "amsgrad": True}),
        _step(base, {"type": "adamw"}),
        _step(base, {"type": "sgd"}),
        _step(base, {"type": "sgd", "momentum": 0.9}),  # a momentum slot
        _step(base, {"type": "sgd", "momentum": 0.9, "nesterov": True}),
        _step(base, {"type": "rmsprop"}),
        _step(base, {"type": "rmsprop", "momentum": 0.5}),
        _step(base, {"type": "rmsprop", "centered": True}),
        _step(base, {"type": "adagrad"}),
        _step(base, {"type": "adam"}, {"norm": 1.0}),
        _step(base, {"type": "adam"}, {"global_norm": 1.0}),
        _step(base, {"type": "adam"}, {"value": 1.0}),
        _step(spec(0), {"type": "adam"}),  # no regularizer
        _step(spec(1, l2=0.01), {"type": "adam"}),  # another seed
    ]
    assert len({j.signature() for j in different}) == len(different)
    assert (
        _step(base, {"type": "sgd", "momentum": 0.5}).signature()
        == _step(base, {"type": "sgd", "momentum": 0.9}).signature()
    )

    def regularized(penalty: dict[str, float]) -> str:
        model = ModelSpec.model_validate(
            {"input_shape": [4], "layers": [{"type": "dense", "units": 2, "kernel_regularizer": penalty}]}
        ).model_dump()
        return ModelGradientJob(model, X, None, None, MSE).signature()

    kinds = [
        {"l1": 0.1},
        {"l1": 0.2},
        {"l2": 0.1},
        {"l2": 0.0},
        {"l1": 0.1, "l2": 0.1},
        {"l1": 0.5, "l2": 1.0},
    ]
    assert len({regularized(p) for p in kinds}) == 3  # L1, L2 (a zero one too) and L1L2


def test_expression_step_signatures_keep_the_optimizer_kind_and_clip_kind_only() -> None:
    def job(raw: dict[str, Any], clip: dict[str, float] | None = None) -> ExpressionStepJob:
        return ExpressionStepJob("sum(x**2)", {"x": np.ones(3)}, optimizer=optimizer(raw), clip=clip)

    assert (
        job({"type": "adam", "learning_rate": 0.1}, {"value": 1.0}).signature()
        == job({"type": "adam", "learning_rate": 0.2, "beta_2": 0.9}, {"value": 3.0}).signature()
    )
    assert (
        job({"type": "adam"}, {"value": 1.0}).signature() != job({"type": "adam"}, {"norm": 1.0}).signature()
    )
    assert list(job({"type": "adagrad", "learning_rate": 0.1}, {"value": 2.0}).hyperparameters()) == [
        0.1,
        1e-7,
        2.0,
    ]


def test_non_finite_hyper_parameters_are_refused() -> None:
    job = ExpressionStepJob(
        "sum(x**2)", {"x": np.ones(2)}, optimizer={"type": "sgd", "learning_rate": float("nan")}
    )
    with pytest.raises(InvalidRequest, match="finite"):
        execute(job)
