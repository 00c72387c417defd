"""Training steps load weights and optimizer state in one traced call and read them back in one.

Pinned against in-process Keras (the guide's custom training loop, with Keras' own clipping), over
the engine, over the app in-process (JSON lists and base64 both ways) and over a real server, whose
worker pool carries the packed results between processes.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from typing import Any

import httpx
import keras
import numpy as np
import pytest
import tensorflow as tf
from fastapi.testclient import TestClient
from starlette.datastructures import State

from service.api import Settings, create_app, endpoints, offload
from service.api.model_job import request_elements
from service.api.model_schemas import ModelSpec, TrainStepRequest
from service.engine import execute
from service.errors import ShapeError
from service.jobs import ModelGradientJob, ModelGradientResult, TrainStepJob, TrainStepResult
from service.limits import Limits
from tests.api.fakes import InlinePool
from tests.tolerances import (
    ILL_CONDITIONED_ADAM,
    KERAS_FLOAT32,
    KERAS_FLOAT32_FORWARD,
    Tolerance,
    approx,
    assert_close,
)

# A well-conditioned network for "equal to Keras": no bias before BatchNorm (BatchNorm cancels it, so
# its exact gradient is 0 and Adam would turn rounding noise into a learning-rate-sized move), and
# tanh rather than relu (a relu unit active on all or on one of six samples makes BatchNorm cancel its
# kernel column as well). test_the_fixture_is_well_conditioned_for_adam checks the property;
# test_an_ill_conditioned_network_agrees_only_as_far_as_rounding_allows documents the other case.
RAW_SPEC: dict[str, Any] = {
    "input_shape": [3],
    "seed": 7,
    "layers": [
        {"type": "dense", "units": 8, "activation": "tanh", "use_bias": False},
        # momentum 1: the moving statistics (non-trainable weights) keep their loaded values exactly.
        {"type": "batch_norm", "momentum": 1.0},
        {"type": "dense", "units": 2},
    ],
}
SPEC = ModelSpec.model_validate(RAW_SPEC).model_dump()
MSE = {"type": "mse", "from_logits": False, "delta": 1.0}
RNG = np.random.default_rng(13)
X = RNG.normal(size=(6, 3)).astype(np.float32)
Y = RNG.normal(size=(6, 2)).astype(np.float32)
# kernel, gamma, beta, moving_mean, moving_variance (> 0), kernel, bias: get_weights() order.
SHAPES = [(3, 8), (8,), (8,), (8,), (8,), (8, 2), (2,)]
WEIGHTS = [RNG.normal(scale=0.5, size=s).astype(np.float32) for s in SHAPES]
WEIGHTS[4] = np.abs(WEIGHTS[4]) + 0.5
TRAINABLE = (0, 1, 2, 5, 6)  # positions of the trainable weights in get_weights() order
CLIP_NORM = 0.5


# Through the wire schema, so every default is filled in as the API fills it.
def optimizer_config(raw: dict[str, Any]) -> dict[str, Any]:
    request = TrainStepRequest.model_validate({"model": RAW_SPEC, "x": [[0.0] * 3], "optimizer": raw})
    return request.optimizer.model_dump()


ADAM = optimizer_config({"type": "adam", "learning_rate": 0.05})
SGD = optimizer_config({"type": "sgd", "learning_rate": 0.1, "momentum": 0.9})
Trained = tuple[list[np.ndarray], list[np.ndarray], list[float]]  # weights, optimizer state, losses


def keras_model(weights: list[np.ndarray], first: keras.layers.Layer | None = None) -> keras.Model:
    """The same network written by hand with Keras (not through our builder)."""
    model = keras.Sequential(
        [
            keras.Input((3,)),
            first or keras.layers.Dense(8, activation="tanh", use_bias=False),
            keras.layers.BatchNormalization(momentum=1.0),
            keras.layers.Dense(2),
        ]
    )
    model.set_weights(weights)
    return model


def keras_steps(
    weights: list[np.ndarray],
    steps: int,
    x: np.ndarray = X,
    y: np.ndarray = Y,
    sgd: bool = False,
    first: keras.layers.Layer | None = None,
) -> Trained:
    """Adam (or SGD) with clipnorm, ``steps`` times: the new weights, the optimizer state and losses."""
    model = keras_model(weights, first)
    if sgd:
        optimizer = keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, clipnorm=CLIP_NORM)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=0.05, clipnorm=CLIP_NORM)
    loss_fn = keras.losses.MeanSquaredError()
    losses = []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        losses.append(float(loss))
    # The documented order: the iteration count, then the slots; the learning rate is not state.
    state = [np.asarray(v.numpy(), np.float32) for v in optimizer.variables if "learning_rate" not in v.path]
    return [np.asarray(w) for w in model.get_weights()], state, losses


def close(a: list[np.ndarray], b: list[np.ndarray], tolerance: Tolerance = KERAS_FLOAT32) -> None:
    assert len(a) == len(b)
    for i, (p, q) in enumerate(zip(a, b, strict=True)):
        assert_close(p, q, tolerance, f"tensor {i}")


def step_job(
    weights: Any,
    state: Any,
    *,
    steps: int = 1,
    optimizer: Any = None,
    x: Any = X,
    y: Any = Y,
    spec: dict[str, Any] = SPEC,
) -> TrainStepJob:
    return TrainStepJob(
        spec, x, y, weights, optimizer or ADAM, state, MSE, clip={"norm": CLIP_NORM}, steps=steps
    )


def run(job: TrainStepJob) -> TrainStepResult:
    result = execute(job, Limits())
    assert isinstance(result, TrainStepResult)
    return result


# --- the engine


def test_weights_in_equal_weights_out_at_zero_learning_rate() -> None:
    sgd = {"type": "sgd", "learning_rate": 0.0, "momentum": 0.0, "nesterov": False}
    result = run(step_job(WEIGHTS, [np.asarray(41.0, np.float32)], optimizer=sgd))
    # Bit for bit: the loaded values, read back after a step that moves nothing (moving stats included).
    for given, got in zip(WEIGHTS, result.weights, strict=True):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, given)
    # They were loaded before the forward pass: the loss is Keras' loss at these weights.
    reference = keras.losses.MeanSquaredError()(Y, keras_model(WEIGHTS)(X, training=True))
    assert result.history[0].loss == approx(float(reference), KERAS_FLOAT32_FORWARD)
    # And the optimizer state was loaded and read back: the iteration count went on from 41.
    assert [s.tolist() for s in result.optimizer_state] == [42.0]


def test_a_step_from_given_weights_and_state_equals_the_next_keras_step() -> None:
    w2, state2, _ = keras_steps(WEIGHTS, 2)
    w3, state3, losses = keras_steps(WEIGHTS, 3)
    assert state2[0] == 2.0 and len(state2) == 1 + 2 * len(TRAINABLE)  # iteration, then m and v of each
    result = run(step_job(w2, state2))
    close(result.weights, w3)
    close(result.optimizer_state, state3)
    assert result.history[0].loss == approx(losses[2], KERAS_FLOAT32)


def test_k_steps_in_one_call_equal_keras_and_return_every_loss() -> None:
    w4, state4, losses = keras_steps(WEIGHTS, 4)
    result = run(step_job(WEIGHTS, None, steps=4))
    close(result.weights, w4)
    close(result.optimizer_state, state4)
    assert_close([h.loss for h in result.history], losses, KERAS_FLOAT32)


def test_one_compiled_program_serves_every_batch_size() -> None:
    # SGD: Adam's first step divides tiny gradients by their own size, too sensitive for 2 examples.
    for n in (6, 2, 5):
        w, state, _ = keras_steps(WEIGHTS, 1, X[:n], Y[:n], sgd=True)
        result = run(step_job(WEIGHTS, None, x=X[:n], y=Y[:n], optimizer=SGD))
        close(result.weights, w)
        close(result.optimizer_state, state)


def keras_gradients(model: keras.Model, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, model(x, training=True))
    return [np.asarray(g) for g in tape.gradient(loss, model.trainable_variables)]


def test_the_fixture_is_well_conditioned_for_adam() -> None:
    # Adam's first step is lr * g / (|g| + 1e-7): it is insensitive to rounding noise in g (~1e-7 * |g|)
    # only where |g| is far above 1e-7. Every trainable gradient entry here is over 1e-4.
    gradients = keras_gradients(keras_model(WEIGHTS), X, Y)
    assert min(float(np.min(np.abs(g))) for g in gradients) > 1e-4


def test_an_ill_conditioned_network_agrees_only_as_far_as_rounding_allows() -> None:
    """Dense(8, relu) with a bias, into BatchNorm: where a unit is active on every sample, BatchNorm
    cancels its bias, whose exact gradient is then 0. What still agrees with Keras, and how far."""
    raw = {
        **RAW_SPEC,
        "layers": [{"type": "dense", "units": 8, "activation": "relu"}, *RAW_SPEC["layers"][1:]],
    }
    spec = ModelSpec.model_validate(raw).model_dump()
    rng = np.random.default_rng(11)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    y = rng.normal(size=(6, 2)).astype(np.float32)
    shapes = [(3, 8), (8,), (8,), (8,), (8,), (8,), (8, 2), (2,)]  # kernel, *bias*, then as WEIGHTS
    weights = [rng.normal(scale=0.5, size=s).astype(np.float32) for s in shapes]
    weights[5] = np.abs(weights[5]) + 0.5
    always_active = np.all(x @ weights[0] + weights[1] > 0, axis=0)
    assert always_active.any()  # the case this test is about (unit 3 of this fixture)

    def first() -> keras.layers.Layer:
        return keras.layers.Dense(8, activation="relu")

    # One gradient agrees with Keras as well as on any network; the cancelled biases are noise on
    # both sides, under 1e-6 where the exact value is 0.
    result = execute(ModelGradientJob(spec, x, y, weights, MSE, training=True), Limits())
    assert isinstance(result, ModelGradientResult) and result.weight_gradients is not None
    ours = [result.weight_gradients[i] for i in (0, 1, 2, 3, 6, 7)]  # the trainable ones
    reference = keras_gradients(keras_model(weights, first()), x, y)
    close(ours, reference)
    assert np.all(np.abs(ours[1][always_active]) < 1e-6)
    assert np.all(np.abs(reference[1][always_active]) < 1e-6)
    # Four Adam steps: that noise decides how far Adam moves the cancelled bias, and the difference
    # spreads to the other weights, so both sides agree only to ILL_CONDITIONED_ADAM (see its why).
    w4, state4, losses = keras_steps(weights, 4, x, y, first=first())
    trained = run(step_job(weights, None, steps=4, x=x, y=y, spec=spec))
    close(trained.weights, w4, ILL_CONDITIONED_ADAM)
    assert_close([h.loss for h in trained.history], losses, ILL_CONDITIONED_ADAM)


def test_the_worker_checks_shapes_before_loading() -> None:
    bad = [*WEIGHTS[:2], np.zeros((9,), np.float32), *WEIGHTS[3:]]
    with pytest.raises(ShapeError) as error:
        run(step_job(bad, None))
    assert error.value.extra["field"] == "weights[2]"
    assert "[9]" in str(error.value) and "[8]" in str(error.value)
    with pytest.raises(ShapeError) as error:
        run(step_job(WEIGHTS, [np.asarray(0.0, np.float32)]))  # Adam needs its slots too
    assert error.value.extra["field"] == "optimizer_state"


# --- the app in-process


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(), pool=InlinePool()), raise_server_exceptions=False) as c:
        yield c


def b64(array: np.ndarray) -> dict[str, Any]:
    a = np.asarray(array, "<f4")
    return {"dtype": "float32", "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


def from_wire(value: Any) -> np.ndarray:
    if isinstance(value, dict):
        raw = base64.b64decode(value["b64"])
        return np.frombuffer(raw, value["dtype"]).reshape(value["shape"]).astype(np.float32)
    return np.asarray(value, np.float32)


def body(weights: list[np.ndarray] | None, state: list[np.ndarray] | None, encoding: str) -> dict[str, Any]:
    def wire(a: np.ndarray) -> Any:
        return b64(a) if encoding == "base64" else a.tolist()

    out: dict[str, Any] = {
        "model": RAW_SPEC, "x": wire(X), "y": wire(Y), "loss": "mse", "encoding": encoding,
        "optimizer": {"type": "adam", "learning_rate": 0.05}, "clip": {"norm": CLIP_NORM},
    }  # fmt: skip
    if weights is not None:
        out["weights"] = [wire(w) for w in weights]
    if state is not None:
        out["optimizer_state"] = [wire(s) for s in state]
    return out


def http_steps(post: Any, encoding: str, steps: int) -> Trained:
    """``steps`` single-step requests, each sending back the weights and state of the previous answer."""
    weights: list[np.ndarray] | None = WEIGHTS
    state: list[np.ndarray] | None = None
    losses = []
    for _ in range(steps):
        response = post(body(weights, state, encoding))
        assert response.status_code == 200, response.text
        answer = response.json()
        if encoding == "base64":
            assert all(isinstance(t, dict) for t in answer["weights"] + answer["optimizer_state"])
        weights = [from_wire(w) for w in answer["weights"]]
        state = [from_wire(s) for s in answer["optimizer_state"]]
        losses.append(answer["loss"])
    assert weights is not None and state is not None
    return weights, state, losses


def test_steps_with_base64_and_with_json_lists_equal_keras(client: TestClient) -> None:
    def post(payload: dict[str, Any]) -> Any:
        return client.post("/v1/model/train-step", json=payload)

    reference = keras_steps(WEIGHTS, 3)
    as_json = http_steps(post, "json", 3)
    as_b64 = http_steps(post, "base64", 3)
    for weights, state, losses in (as_json, as_b64):
        close(weights, reference[0])
        close(state, reference[1])
        assert_close(losses, reference[2], KERAS_FLOAT32)
    # float32 values survive both wire forms exactly, so the two runs are the same computation.
    for a, b in zip(as_json[0] + as_json[1], as_b64[0] + as_b64[1], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("encoding", ["json", "base64"])
def test_a_mismatched_weight_shape_is_a_422_shape_error_naming_the_field(
    client: TestClient, encoding: str
) -> None:
    bad = [*WEIGHTS[:5], np.zeros((2, 8), np.float32), WEIGHTS[6]]
    response = client.post("/v1/model/train-step", json=body(bad, None, encoding))
    assert response.status_code == 422
    problem = response.json()
    assert response.headers["content-type"].startswith("application/problem+json")
    assert problem["code"] == "shape_error"
    assert problem["field"] == "weights[5]"
    assert "[2, 8]" in problem["detail"] and "[8, 2]" in problem["detail"]


def run_train_step(request: TrainStepRequest, settings: Settings, pool: InlinePool) -> Any:
    """The endpoint table's one path for a train-step, with the app's state and no HTTP request."""
    return endpoints.serve(endpoints.TRAIN_STEP, request, State({"settings": settings, "pool": pool}))


def test_run_train_step_is_a_plain_coroutine_without_a_request() -> None:
    request = TrainStepRequest.model_validate(body(WEIGHTS, None, "base64") | {"steps": 2})
    content = asyncio.run(run_train_step(request, Settings(), InlinePool()))
    weights, state, losses = keras_steps(WEIGHTS, 2)
    close([from_wire(w) for w in content["weights"]], weights)
    close([from_wire(s) for s in content["optimizer_state"]], state)
    assert [h["loss"] for h in content["history"]] == approx(losses, KERAS_FLOAT32)
    assert content["steps"] == 2 and content["meta"]["cache"] in ("hit", "miss")
    bad = TrainStepRequest.model_validate(body([WEIGHTS[0]], None, "json"))
    with pytest.raises(ShapeError) as error:
        asyncio.run(run_train_step(bad, Settings(), InlinePool()))
    assert error.value.extra["field"] == "weights"


def test_large_requests_decode_and_render_in_a_thread_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(offload, "ON_LOOP_ELEMENTS", 0)  # where the job is built
    monkeypatch.setattr(endpoints, "ON_LOOP_ELEMENTS", 0)  # where the result is rendered
    request = TrainStepRequest.model_validate(body(WEIGHTS, None, "json"))
    content = asyncio.run(run_train_step(request, Settings(), InlinePool()))
    weights, _, _ = keras_steps(WEIGHTS, 1)
    close([from_wire(w) for w in content["weights"]], weights)


def test_request_elements_counts_claimed_shapes_without_decoding() -> None:
    request = TrainStepRequest.model_validate(body(WEIGHTS, None, "base64"))
    assert request_elements(request) == X.size + Y.size + sum(w.size for w in WEIGHTS)
    as_lists = TrainStepRequest.model_validate(body(None, None, "json"))
    assert request_elements(as_lists) == X.size + Y.size


# --- a real server: the worker pool carries jobs and packed results between processes


def test_a_real_server_steps_with_base64_equal_keras(ready_server: Any) -> None:
    with httpx.Client(base_url=ready_server.url, timeout=60.0) as http:

        def post(payload: dict[str, Any]) -> Any:
            return http.post("/v1/model/train-step", json=payload)

        weights, state, losses = http_steps(post, "base64", 2)
    reference = keras_steps(WEIGHTS, 2)
    close(weights, reference[0])
    close(state, reference[1])
    assert_close(losses, reference[2], KERAS_FLOAT32)
