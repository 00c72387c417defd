"""POST /v1/model/*: the app in-process over the real engine (run in a thread), bad specs, NDJSON streams."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from service.api import Settings, create_app
from tests.api.fakes import InlinePool
from tests.tolerances import CLOSED_FORM, approx, assert_close

LIMITS = {"max_params": 5_000, "max_layers": 6, "max_steps": 50, "max_batch": 64, "request_timeout_s": 60.0}


@pytest.fixture(scope="module")
def pool() -> InlinePool:
    return InlinePool(Settings(**LIMITS).limits())


@pytest.fixture(scope="module")
def client(pool: InlinePool) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(**LIMITS), pool=pool), raise_server_exceptions=False) as c:
        yield c


MODEL = {
    "input_shape": [3],
    "seed": 1,
    "layers": [
        {"type": "dense", "units": 4, "activation": "relu", "kernel_regularizer": {"l2": 0.01}},
        {"type": "dense", "units": 2},
    ],
}
X = [[0.1, -0.2, 0.3], [1.0, 0.5, -0.5], [0.0, 0.2, 0.9]]
Y = [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]
TRAIN = {
    "model": MODEL,
    "x": X,
    "y": Y,
    "optimizer": {"type": "adam", "learning_rate": 0.05},
    "clip": {"norm": 1.0},
}


def test_describe_lists_weights_in_keras_order(client: TestClient) -> None:
    r = client.post("/v1/model/describe", json={"model": MODEL, "optimizer": {"type": "adam"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(w["name"], w["shape"]) for w in body["weights"]] == [
        ("model.layers[0].kernel", [3, 4]),
        ("model.layers[0].bias", [4]),
        ("model.layers[1].kernel", [4, 2]),
        ("model.layers[1].bias", [2]),
    ]
    assert body["param_count"] == 3 * 4 + 4 + 4 * 2 + 2
    assert body["output_shape"] == [2]
    assert body["optimizer_state"][0]["name"] == "iteration"
    assert body["optimizer_state"][1]["name"] == "model.layers[0].kernel/momentum"
    assert len(body["optimizer_state"]) == 1 + 2 * 4


def test_model_gradient_returns_seeded_weights_and_every_gradient(client: TestClient) -> None:
    r = client.post(
        "/v1/model/gradient",
        json={
            "model": MODEL,
            "x": X,
            "y": Y,
            "loss": "mse",
            "wrt": ["weights", "inputs"],
            "saliency": True,
            "adversarial": {"method": "fgsm", "epsilon": 0.05},
            "dtype": "float64",
        },  # fmt: skip
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [np.shape(w) for w in body["weights"]] == [(3, 4), (4,), (4, 2), (2,)]
    assert [np.shape(g) for g in body["weight_gradients"]] == [(3, 4), (4,), (4, 2), (2,)]
    assert np.shape(body["input_gradients"]) == (3, 3) == np.shape(body["x_adv"])
    fgsm = np.asarray(X) + 0.05 * np.sign(body["input_gradients"])
    assert_close(body["x_adv"], fgsm, CLOSED_FORM, "x_adv")
    assert body["loss"] == approx(body["data_loss"] + body["regularization_loss"], CLOSED_FORM)
    # The same weights sent back give the same loss.
    again = client.post(
        "/v1/model/gradient",
        json={"model": MODEL, "x": X, "y": Y, "weights": body["weights"], "dtype": "float64"},
    ).json()
    assert again["loss"] == body["loss"] and "weights" not in again


def test_train_step_single_calls_equal_one_multi_step_call(client: TestClient) -> None:
    one = client.post("/v1/model/train-step", json={**TRAIN, "steps": 4}).json()
    assert len(one["history"]) == 4 and one["steps"] == 4
    weights, state = None, None
    for _ in range(4):
        body: dict[str, Any] = {**TRAIN}
        if weights is not None:
            body |= {"weights": weights, "optimizer_state": state}
        r = client.post("/v1/model/train-step", json=body)
        assert r.status_code == 200, r.text
        weights, state = r.json()["weights"], r.json()["optimizer_state"]
        assert "history" not in r.json()
    assert weights == one["weights"] and state == one["optimizer_state"]
    assert one["history"][-1]["loss"] < one["history"][0]["loss"]
    assert state is not None and state[0] == 4.0


def _lines(response: Any) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in response.iter_lines() if line]


def test_stream_answers_ndjson_progress_then_the_same_result(client: TestClient) -> None:
    plain = client.post("/v1/model/train-step", json={**TRAIN, "steps": 7}).json()
    with client.stream("POST", "/v1/model/train-step", json={**TRAIN, "steps": 7, "stream": True,
                                                             "progress_every": 3}) as r:  # fmt: skip
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = _lines(r)
    assert [line["type"] for line in lines] == ["progress", "progress", "progress", "result"]
    assert [line["step"] for line in lines[:-1]] == [3, 6, 7]
    result = lines[-1]
    assert result["weights"] == plain["weights"] and result["optimizer_state"] == plain["optimizer_state"]
    assert [h["loss"] for h in result["history"]] == [h["loss"] for h in plain["history"]]
    assert lines[1]["loss"] == plain["history"][5]["loss"]


def test_an_error_mid_stream_is_the_last_line(client: TestClient, pool: InlinePool) -> None:
    pool.calls = 0
    pool.fail_on_call = 2
    try:
        with client.stream("POST", "/v1/model/train-step", json={**TRAIN, "steps": 4, "stream": True,
                                                                 "progress_every": 2}) as r:  # fmt: skip
            assert r.status_code == 200
            lines = _lines(r)
    finally:
        pool.fail_on_call = None
    assert [line["type"] for line in lines] == ["progress", "error"]
    assert lines[-1]["problem"]["code"] == "timeout" and lines[-1]["problem"]["status"] == 504


def test_reinforce_and_adversarial_objectives_over_http(client: TestClient) -> None:
    policy = {"input_shape": [3], "layers": [{"type": "dense", "units": 3}]}
    r = client.post(
        "/v1/model/train-step",
        json={
            "model": policy,
            "x": X,
            "optimizer": {"type": "sgd", "learning_rate": 0.1},
            "objective": {
                "type": "reinforce",
                "actions": [0, 2, 1],
                "returns": [1.0, -1.0, 0.5],
                "baseline": "mean",
                "entropy_coefficient": 0.01,
            },
        },  # fmt: skip
    )
    assert r.status_code == 200, r.text
    r = client.post(
        "/v1/model/train-step",
        json={
            **TRAIN,
            "objective": {"type": "adversarial", "epsilon": 0.1, "ratio": 0.5},
            "return_gradients": True,
        },
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["gradients"]) == 4


def _dense(units: Any) -> dict[str, Any]:
    return {"type": "dense", "units": units}


BAD: list[tuple[str, dict[str, Any], int, str, str]] = [
    ("unknown layer", {"model": {**MODEL, "layers": [_dense(2), {"type": "lambda", "function": "x"}]}},
     422, "invalid_request", "model.layers[1]"),
    ("negative units", {"model": {**MODEL, "layers": [_dense(2), _dense(-3)]}}, 422, "invalid_request",
     "model.layers[1].units"),
    ("giant layer", {"model": {**MODEL, "layers": [_dense(100_000)]}}, 422, "limit_exceeded",
     "model.layers[0]"),
    ("too many layers", {"model": {**MODEL, "layers": [_dense(2)] * 7}}, 422, "limit_exceeded",
     "model.layers"),
    ("x vs input_shape", {"x": [[1.0, 2.0]] * 3}, 422, "shape_error", "x"),
    ("y shape", {"y": [[1.0]] * 3}, 422, "shape_error", "y"),
    ("weights count", {"weights": [[[0.0] * 4] * 3]}, 422, "shape_error", "weights"),
    ("weight shape", {"weights": [[[0.0] * 4] * 3, [0.0] * 5, [[0.0] * 2] * 4, [0.0] * 2]}, 422,
     "shape_error",
     "weights[1]"),
    ("unknown optimizer", {"optimizer": {"type": "lbfgs"}}, 422, "invalid_request", "optimizer"),
    ("optimizer argument", {"optimizer": {"type": "sgd", "momentum": -1}}, 422, "invalid_request",
     "optimizer.momentum"),
    ("two clips", {"clip": {"value": 1.0, "norm": 1.0}}, 422, "invalid_request", "clip"),
    ("negative clip", {"clip": {"value": -1.0}}, 422, "invalid_request", "clip.value"),
    ("steps over the limit", {"steps": 51}, 422, "limit_exceeded", "steps"),
    ("optimizer state count", {"optimizer_state": [0.0]}, 422, "shape_error", "optimizer_state"),
    ("iteration", {"optimizer_state": [-1.0] + [[[0.0] * 4] * 3] * 2 + [[0.0] * 4] * 2 + [[[0.0] * 2] * 4] * 2
                   + [[0.0] * 2] * 2}, 422, "invalid_request", "optimizer_state[0]"),
    ("reinforce action",
     {"objective": {"type": "reinforce", "actions": [0, 1, 5], "returns": [1.0, 1.0, 1.0]}},
     422, "invalid_request", "objective.actions[2]"),
    ("reinforce returns", {"objective": {"type": "reinforce", "actions": [0, 1, 1], "returns": [1.0, 1.0]}},
     422, "shape_error", "objective.returns"),
    ("sparse labels", {"loss": "sparse_categorical_crossentropy", "y": [0, 1, 2]}, 422, "invalid_request",
     "y"),
    ("missing y", {"y": None}, 422, "invalid_request", "y"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "change", "status", "code", "field"), BAD, ids=[b[0] for b in BAD])
def test_bad_train_steps_name_their_field(
    client: TestClient,
    pool: InlinePool,
    case: str,
    change: dict[str, Any],
    status: int,
    code: str,
    field: str,
) -> None:
    body = {**TRAIN, **change}
    body = {k: v for k, v in body.items() if v is not None}
    before = pool.calls
    r = client.post("/v1/model/train-step", json=body)
    assert r.status_code == status, r.text
    problem = r.json()
    assert r.headers["content-type"].startswith("application/problem+json")
    assert problem["code"] == code, problem
    assert problem["field"] == field, problem
    assert problem["detail"]
    assert pool.calls == before  # refused before any worker was involved


def test_unknown_field_in_a_layer_is_refused(client: TestClient) -> None:
    r = client.post(
        "/v1/model/describe", json={"model": {**MODEL, "layers": [{**_dense(2), "code": "import os"}]}}
    )
    assert r.status_code == 422
    assert r.json()["field"] == "model.layers[0].code", r.json()


def test_token_inputs_are_not_differentiable(client: TestClient) -> None:
    spec = {"input_shape": [2], "layers": [{"type": "embedding", "input_dim": 5, "output_dim": 2},
                                           {"type": "flatten"}, _dense(1)]}  # fmt: skip
    r = client.post(
        "/v1/model/gradient", json={"model": spec, "x": [[1, 4]], "y": [[1.0]], "wrt": ["inputs"]}
    )
    assert r.status_code == 422 and r.json()["code"] == "not_differentiable" and r.json()["field"] == "wrt"
    r = client.post("/v1/model/gradient", json={"model": spec, "x": [[1, 5]], "y": [[1.0]]})
    assert r.status_code == 422 and r.json()["field"] == "x"
    r = client.post("/v1/model/gradient", json={"model": spec, "x": [[1, 4], [0, 0]], "y": [[1.0], [0.0]]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/v1/model/gradient", "/v1/model/train-step", "/v1/step"])
def test_model_routes_answer_alike_on_the_fast_path_and_through_fastapi(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    from service.api import fastpath

    body = {"model": MODEL, "x": [[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]], "y": [[0.1, 0.2], [0.3, -0.4]],
            "loss": "mse", "weights": None}  # fmt: skip
    if path.endswith("train-step"):
        body["optimizer"] = {"type": "adam", "learning_rate": 0.01}
    if path == "/v1/step":
        body = {
            "expression": "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)",
            "variables": {"x": [0.5, -1.0, 2.0]},
            "optimizer": {"type": "adam", "learning_rate": 0.01},
            "steps": 3,
            "dtype": "float64",
        }
    fast = client.post(path, json=body)
    with monkeypatch.context() as m:
        m.setattr(fastpath, "_validate", lambda model, raw: None)  # every body handed to the route
        slow = client.post(path, json=body)
    assert fast.status_code == slow.status_code == 200, (fast.text, slow.text)

    def without_timing(answer: dict[str, Any]) -> dict[str, Any]:
        answer.get("meta", {}).pop("total_ms", None)
        answer.get("meta", {}).pop("compute_ms", None)
        answer.get("meta", {}).pop("cache", None)
        return answer

    assert without_timing(fast.json()) == without_timing(slow.json())
