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
        "expression": "sum(fori(2.5, step, x))",
        "variables": {"x": [1.0]},
        "functions": {"step": {"params": ["i", "c"], "body": "c * 2"}},
    }
    response = httpx.post(f"{ready_server.url}/v1/gradient", json=body, timeout=120)
    assert response.status_code == 400, response.text
    problem = response.json()
    assert "step count of fori() must be an integer" in problem["detail"]
    assert problem["line"] == 1 and problem["column"] == 10


DOUBLING = {"step": {"params": ["i", "c"], "body": "c * 2"}}


def test_a_constant_as_the_step_count(ready_server: LiveServer) -> None:
    # x doubled n times: value 2**n x, gradient 2**n. Each n is its own program (the count is
    # static), so two requests that differ only in n must not share one.
    def post(n: object, client: httpx.Client) -> httpx.Response:
        body = {
            "expression": "sum(fori(n, step, x))",
            "variables": {"x": [1.0, 3.0]},
            "constants": {"n": n},
            "functions": DOUBLING,
            "dtype": "float64",
        }
        return client.post(f"{ready_server.url}/v1/gradient", json=body, timeout=120)

    with httpx.Client() as client:
        for n in (3, 5, 3.0, 0):
            response = post(n, client)
            assert response.status_code == 200, response.text
            data = response.json()
            assert_close(data["value"], 4.0 * 2**n, CLOSED_FORM, f"value for n={n}")
            assert_close(data["gradient"]["x"], [2.0**n] * 2, CLOSED_FORM, f"gradient for n={n}")
        for n, wrong in ((2.5, "got 2.5"), ([2, 3], "not shape [2]"), (-1, "from 0 to")):
            response = post(n, client)
            assert response.status_code == 422, response.text
            problem = response.json()
            assert problem["code"] == "invalid_request" and problem["field"] == "constants.n"
            assert wrong in problem["detail"], problem["detail"]


def test_a_step_count_must_name_a_constant_of_the_expression(ready_server: LiveServer) -> None:
    cases = [
        # a variable is differentiated, never a count
        ("sum(fori(x, step, x))", DOUBLING, "'x' is not one of the request's constants", "expression", 10),
        # inside a function the names are its parameters: tensors
        (
            "sum(outer(x, n))",
            DOUBLING | {"outer": {"params": ["c", "k"], "body": "fori(k, step, c)"}},
            "a function's parameters are tensors",
            "functions.outer.body",
            6,
        ),
    ]
    for expression, functions, message, source, column in cases:
        body = {
            "expression": expression,
            "variables": {"x": [1.0]},
            "constants": {"n": 3.0},
            "functions": functions,
        }
        response = httpx.post(f"{ready_server.url}/v1/gradient", json=body, timeout=120)
        assert response.status_code == 400, response.text
        problem = response.json()
        assert problem["code"] == "invalid_argument" and message in problem["detail"], problem
        assert problem["source"] == source and problem["column"] == column
