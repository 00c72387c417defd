"""End to end through HTTP, the pool and a real TensorFlow worker: derivatives against closed forms."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np

from service.tensorcodec import decode_tensor
from tests.conftest import LiveServer
from tests.tolerances import CLOSED_FORM, assert_close

ROSENBROCK = "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)"


def rosenbrock_gradient(x: np.ndarray) -> np.ndarray:
    g = np.zeros_like(x)
    g[:-1] = -400 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2 * (1 - x[:-1])
    g[1:] += 200 * (x[1:] - x[:-1] ** 2)
    return g


def rosenbrock_hessian(x: np.ndarray) -> np.ndarray:
    n = len(x)
    h = np.zeros((n, n))
    for i in range(n - 1):
        h[i, i] += 1200 * x[i] ** 2 - 400 * x[i + 1] + 2
        h[i, i + 1] = h[i + 1, i] = -400 * x[i]
        h[i + 1, i + 1] += 200
    return h


def compute(server: LiveServer, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/v1/gradient", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    data: dict[str, Any] = response.json()
    return data


def test_square_first_and_second_derivative(ready_server: LiveServer) -> None:
    data = compute(ready_server, {"expression": "x**2", "variables": {"x": 3.0}, "order": 2})
    assert data["value"] == 9.0
    assert data["gradient"] == {"x": 6.0}
    assert data["derivative"] == {"variable": "x", "order": 2, "derivatives": [6.0, 2.0]}
    assert data["dtype"] == "float32"
    assert data["meta"]["cache"] in ("hit", "miss")
    assert set(data) == {"value", "gradient", "derivative", "dtype", "meta"}


def test_second_request_hits_the_cache(ready_server: LiveServer) -> None:
    body = {"expression": "sum(sin(x) * y)", "variables": {"x": [0.1, 0.2]}, "constants": {"y": [1.0, 2.0]}}
    compute(ready_server, body)
    assert compute(ready_server, body)["meta"]["cache"] == "hit"


def test_rosenbrock_gradient_and_hessian(ready_server: LiveServer) -> None:
    x = np.array([1.5, -0.5, 2.0, 0.3, -1.2, 0.7, 1.1, -0.9, 0.4, 2.2])
    data = compute(
        ready_server,
        {
            "expression": ROSENBROCK,
            "variables": {"x": x.tolist()},
            "derivatives": ["gradient", "hessian"],
            "dtype": "float64",
        },  # fmt: skip
    )
    assert_close(data["gradient"]["x"], rosenbrock_gradient(x), CLOSED_FORM, "gradient")
    assert_close(data["hessian"]["x"]["x"], rosenbrock_hessian(x), CLOSED_FORM, "hessian")
    assert data["dtype"] == "float64"


def test_custom_relu_gradient(ready_server: LiveServer) -> None:
    data = compute(
        ready_server,
        {
            "expression": "sum(custom_relu(x))",
            "variables": {"x": [-2.0, 0.0, 2.0]},
            "functions": {
                "custom_relu": {"params": ["x"], "body": "maximum(0.0, x)", "gradient": {"x": "dy * (x > 0)"}}
            },
        },
    )
    assert data["gradient"] == {"x": [0.0, 0.0, 1.0]}


def test_hvp_jvp_vjp_and_base64(ready_server: LiveServer) -> None:
    x = np.array([1.5, -0.5, 2.0])
    v = np.array([1.0, 2.0, 3.0])
    data = compute(
        ready_server,
        {
            "expression": ROSENBROCK,
            "variables": {"x": x.tolist()},
            "dtype": "float64",
            "derivatives": ["hvp", "jvp"],
            "tangents": {"x": v.tolist()},
            "encoding": "base64",
        },  # fmt: skip
    )
    assert set(data) == {"value", "hvp", "jvp", "dtype", "meta"}
    hvp = decode_tensor(data["hvp"]["x"], "float64", field="hvp.x")
    assert_close(hvp, rosenbrock_hessian(x) @ v, CLOSED_FORM, "hvp")
    jvp = decode_tensor(data["jvp"], "float64", field="jvp")
    assert_close(jvp, rosenbrock_gradient(x) @ v, CLOSED_FORM, "jvp")
    data = compute(
        ready_server,
        {
            "expression": "x * 2",
            "variables": {"x": [1.0, 2.0]},
            "derivatives": ["vjp", "jacobian"],
            "cotangent": [1.0, 10.0],
        },  # fmt: skip
    )
    assert data["vjp"] == {"x": [2.0, 20.0]}
    assert data["jacobian"] == {"x": [[2.0, 0.0], [0.0, 2.0]]}


def test_batch_of_points(ready_server: LiveServer) -> None:
    grid = np.linspace(-2.0, 2.0, 1000)
    data = compute(
        ready_server,
        {
            "expression": "x**3",
            "variables": {"x": grid.tolist()},
            "batch": True,
            "order": 2,
            "dtype": "float64",
        },
    )
    assert_close(data["value"], grid**3, CLOSED_FORM, "f")
    first, second = data["derivative"]["derivatives"]
    assert_close(first, 3 * grid**2, CLOSED_FORM, "f'")
    assert_close(second, 6 * grid, CLOSED_FORM, "f''")


def test_nonfinite_values_travel_as_strings(ready_server: LiveServer) -> None:
    data = compute(ready_server, {"expression": "log(x)", "variables": {"x": [0.0, -1.0, 1.0, "Infinity"]}})
    assert data["value"] == ["-Infinity", "NaN", 0.0, "Infinity"]
    assert data["gradient"]["x"][:3] == ["Infinity", -1.0, 1.0]


def test_unused_variable_gets_zeros(ready_server: LiveServer) -> None:
    data = compute(ready_server, {"expression": "sum(x)", "variables": {"x": [1.0, 2.0], "z": [[1.0, 2.0]]}})
    assert data["gradient"] == {"x": [1.0, 1.0], "z": [[0.0, 0.0]]}


def test_evaluation_error_from_the_worker_is_a_4xx(ready_server: LiveServer) -> None:
    response = httpx.post(
        f"{ready_server.url}/v1/gradient",
        json={"expression": "sum(x @ y)", "variables": {"x": [[1.0, 2.0]], "y": [[1.0, 2.0]]}},
        timeout=60,
    )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "shape_error"
