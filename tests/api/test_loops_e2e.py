"""scan and grad through HTTP, the pool and a real worker: values and derivatives against closed forms."""

from __future__ import annotations

import httpx
import numpy as np

from tests.conftest import LiveServer
from tests.tolerances import CLOSED_FORM, assert_close


def test_a_scan_with_grad_inside_and_its_gradient(ready_server: LiveServer) -> None:
    # Three gradient steps on f(x) = sum(x**2) / 2 scale x by 0.9 each: sum of squares of 0.729 x,
    # whose gradient is 2 * 0.729**2 x.
    body = {
        "expression": "sum(scan(descend, x, zeros([3]))[-1]**2)",
        "variables": {"x": [1.0, -2.0]},
        "functions": {
            "f": {"params": ["x"], "body": "sum(x**2) / 2"},
            "descend": {"params": ["x", "t"], "body": "x - 0.1 * grad(f, x)"},
        },
        "dtype": "float64",
    }
    response = httpx.post(f"{ready_server.url}/v1/gradient", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    x = np.array([1.0, -2.0])
    assert_close(data["value"], np.sum((0.729 * x) ** 2), CLOSED_FORM, "value")
    assert_close(data["gradient"]["x"], 2 * 0.729**2 * x, CLOSED_FORM, "gradient")


def test_a_misused_loop_is_a_located_problem(ready_server: LiveServer) -> None:
    body = {
        "expression": "sum(fori(n, step, x))",
        "variables": {"x": [1.0]},
        "constants": {"n": 3.0},
        "functions": {"step": {"params": ["i", "c"], "body": "c * 2"}},
    }
    response = httpx.post(f"{ready_server.url}/v1/gradient", json=body, timeout=120)
    assert response.status_code == 400, response.text
    problem = response.json()
    assert "step count of fori() must be an integer literal" in problem["detail"]
    assert problem["line"] == 1 and problem["column"] == 10
