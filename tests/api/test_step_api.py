"""POST /v1/step and a streamed train-step against a real `tapeserve serve` (one spawned TF worker)."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from tests.conftest import LiveServer
from tests.tolerances import CLOSED_FORM, CONVERGED, approx, assert_close

ROSENBROCK = "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)"
# Bounded: every request here finishes in well under a second once the program is compiled.
TIMEOUT = httpx.Timeout(120.0)


def _post(server: LiveServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{server.url}{path}", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, f"{r.text}\n{server.log()[-4000:]}"
    result: dict[str, Any] = r.json()
    return result


def test_rosenbrock_minimized_over_http_converges(ready_server: LiveServer) -> None:
    body = {
        "expression": ROSENBROCK,
        "variables": {"x": [-1.2, 1.0]},
        "optimizer": {"type": "adam", "learning_rate": 0.02},
        "clip": {"global_norm": 10.0},
        "steps": 3000,
        "dtype": "float64",
    }
    result = _post(ready_server, "/v1/step", body)
    assert result["steps"] == 3000 and len(result["history"]) == 3000
    assert_close(result["variables"]["x"], [1.0, 1.0], CONVERGED, "x after 3000 steps")
    assert result["value"] < 1e-6 < result["history"][0]["loss"]
    assert result["history"][0]["loss"] == approx(24.2, CLOSED_FORM)  # f(-1.2, 1) = 4.84 + 19.36
    assert result["history"][0]["clipped_gradient_norm"] == approx(10.0, CLOSED_FORM)  # |grad| = 232.9 > 10


def test_k_single_steps_equal_one_k_step_call_over_http(ready_server: LiveServer) -> None:
    base = {
        "expression": ROSENBROCK,
        "optimizer": {"type": "rmsprop", "learning_rate": 0.01, "momentum": 0.5},
        "clip": {"value": 50.0},
    }
    once = _post(ready_server, "/v1/step", {**base, "variables": {"x": [-1.0, 2.0, 0.5]}, "steps": 5})
    variables: dict[str, Any] = {"x": [-1.0, 2.0, 0.5]}
    state = None
    for _ in range(5):
        body = {**base, "variables": variables} | ({} if state is None else {"optimizer_state": state})
        step = _post(ready_server, "/v1/step", body)
        variables, state = step["variables"], step["optimizer_state"]
    assert variables == once["variables"] and state == once["optimizer_state"]
    assert step["value"] == once["history"][-1]["loss"]


def test_streamed_train_step_end_to_end(ready_server: LiveServer) -> None:
    body = {
        "model": {"input_shape": [2], "layers": [{"type": "dense", "units": 8, "activation": "tanh"},
                                                 {"type": "dense", "units": 1}]},
        "x": [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]],
        "y": [[0.0], [1.0], [1.0], [0.0]],
        "optimizer": {"type": "adam", "learning_rate": 0.05},
        "steps": 200,
        "stream": True,
        "progress_every": 50,
    }  # fmt: skip
    with httpx.stream("POST", f"{ready_server.url}/v1/model/train-step", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [orjson.loads(line) for line in r.iter_lines() if line]
    assert [line["type"] for line in lines] == ["progress"] * 4 + ["result"]
    assert [line["step"] for line in lines[:-1]] == [50, 100, 150, 200]
    result = lines[-1]
    assert len(result["history"]) == 200 and result["optimizer_state"][0] == 200.0
    assert result["loss"] < 0.05 < result["history"][0]["loss"]  # XOR learned
    plain = _post(ready_server, "/v1/model/train-step", {**body, "stream": False})
    assert plain["weights"] == result["weights"]


def test_bad_expression_step_is_a_problem(ready_server: LiveServer) -> None:
    r = httpx.post(
        f"{ready_server.url}/v1/step",
        json={"expression": "x * 2", "variables": {"x": [1.0, 2.0]}, "optimizer": {"type": "sgd"}},
        timeout=TIMEOUT,
    )
    assert r.status_code == 422 and r.json()["code"] == "shape_error" and r.json()["field"] == "expression"
    r = httpx.post(
        f"{ready_server.url}/v1/step",
        json={"expression": "sum(y)", "variables": {"x": [1.0]}, "optimizer": {"type": "sgd"}},
        timeout=TIMEOUT,
    )
    assert r.status_code == 400 and r.json()["code"] == "unknown_name"
