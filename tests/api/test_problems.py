"""Every error the API process can produce is one application/problem+json body (in-process, fake pool)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.errors import (
    EvaluationError,
    MemoryLimitExceeded,
    Overloaded,
    Quarantined,
    TapeserveError,
    Timeout,
    WorkerCrashed,
)
from tests.api.fakes import FakePool

PROBLEM_KEYS = {"type", "title", "status", "detail", "code", "instance"}


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert PROBLEM_KEYS <= set(body), body
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"urn:tapeserve:problem:{code}"
    assert "Traceback" not in response.text
    return body


def post(client: TestClient, body: Any, path: str = "/v1/gradient") -> httpx.Response:
    return client.post(path, json=body)


def test_parse_error_has_line_column_and_caret(client: TestClient) -> None:
    body = assert_problem(
        post(client, {"expression": "sum(x +* 2)", "variables": {"x": [1.0]}}), 400, "parse_error"
    )
    assert body["line"] == 1
    assert isinstance(body["column"], int)
    line, caret = body["snippet"].split("\n")
    assert line == "sum(x +* 2)"
    assert caret.strip().startswith("^")
    assert body["instance"] == "/v1/gradient"


def test_parse_error_on_second_line(client: TestClient) -> None:
    body = assert_problem(
        post(client, {"expression": "x +\n  $", "variables": {"x": 1.0}}), 400, "parse_error"
    )
    assert body["line"] == 2
    assert body["column"] == 3


def test_unknown_name_suggests(client: TestClient) -> None:
    body = assert_problem(
        post(client, {"expression": "sum(xx)", "variables": {"x": [1.0]}}), 400, "unknown_name"
    )
    assert body["name"] == "xx"
    assert "x" in body["suggestions"]


def test_unknown_function(client: TestClient) -> None:
    assert_problem(post(client, {"expression": "sinn(x)", "variables": {"x": 1.0}}), 400, "unknown_name")


def test_invalid_argument(client: TestClient) -> None:
    body = assert_problem(
        post(client, {"expression": "sum(x, axis=x)", "variables": {"x": [1.0]}}), 400, "invalid_argument"
    )
    assert "axis" in body["detail"]


def test_limit_exceeded_expression_length(client: TestClient) -> None:
    body = assert_problem(
        post(client, {"expression": "x+" * 1500 + "x", "variables": {"x": 1.0}}), 422, "limit_exceeded"
    )
    assert body["limit"] == "max_expression_chars"
    assert body["allowed"] == 2_000


def test_limit_exceeded_input_elements(client: TestClient) -> None:
    body = assert_problem(
        post(client, {"expression": "sum(x)", "variables": {"x": [0.0] * 1001}}), 422, "limit_exceeded"
    )
    assert body["limit"] == "max_input_elements"
    assert body["field"] == "variables.x"


def test_limit_exceeded_hessian_size(client: TestClient) -> None:
    body = {"expression": "sum(x)", "variables": {"x": [0.0] * 1000}, "derivatives": ["hessian"]}
    problem = assert_problem(post(client, body), 422, "limit_exceeded")
    assert problem["limit"] == "max_tensor_elements"


def test_payload_too_large_by_content_length(client: TestClient) -> None:
    response = client.post(
        "/v1/gradient", content=b"{" + b" " * (70 * 1024) + b"}", headers={"content-type": "application/json"}
    )
    body = assert_problem(response, 413, "payload_too_large")
    assert body["limit"] == "max_body_bytes"
    assert body["allowed"] == 64 * 1024


def test_payload_too_large_while_streaming(client: TestClient) -> None:
    def chunks() -> Any:
        for _ in range(80):
            yield b" " * 1024

    response = client.post("/v1/gradient", content=chunks(), headers={"content-type": "application/json"})
    assert_problem(response, 413, "payload_too_large")


def test_malformed_json(client: TestClient) -> None:
    response = client.post(
        "/v1/gradient", content=b'{"expression": "x",', headers={"content-type": "application/json"}
    )
    body = assert_problem(response, 400, "invalid_request")
    assert "not valid JSON" in body["detail"]


def test_nan_literal_is_not_json(client: TestClient) -> None:
    response = client.post(
        "/v1/gradient",
        content=b'{"expression": "x", "variables": {"x": NaN}}',
        headers={"content-type": "application/json"},
    )
    assert_problem(response, 400, "invalid_request")


def test_wrong_content_type(client: TestClient) -> None:
    response = client.post("/v1/gradient", content=b"expression=x", headers={"content-type": "text/plain"})
    assert_problem(response, 415, "unsupported_media_type")
    response = client.post("/v1/gradient", content=b'{"expression": "x"}')
    problem = assert_problem(response, 415, "unsupported_media_type")
    assert "missing" in problem["detail"]
    response = client.post(
        "/v1/gradient",
        content=b'{"expression": "x", "variables": {"x": 1.0}}',
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "expression"),
        ({"expression": 3}, "expression"),
        ({"expression": "x", "variables": {"x": 1.0}, "derivatives": ["laplacian"]}, "derivatives[0]"),
        ({"expression": "x", "variables": {"x": 1.0}, "dtype": "float16"}, "dtype"),
        ({"expression": "x", "variables": {"x": 1.0}, "order": 0}, "order"),
        ({"expression": "x", "variables": {"x": 1.0}, "bogus": 1}, "bogus"),
        (
            {"expression": "x", "variables": {"x": 1.0}, "functions": {"f": {"params": ["a"]}}},
            "functions.f.body",
        ),
        ({"expression": "x", "variables": {"x": 1.0}, "timeout_s": -1}, "timeout_s"),
    ],
)
def test_validation_errors_name_the_field(client: TestClient, body: dict[str, Any], field: str) -> None:
    problem = assert_problem(post(client, body), 422, "invalid_request")
    assert problem["field"] == field
    assert problem["detail"].startswith(field)
    assert problem["errors"][0]["field"] == field
    assert "input" not in problem["errors"][0]


def test_body_that_is_not_an_object(client: TestClient) -> None:
    problem = assert_problem(post(client, [1, 2]), 422, "invalid_request")
    assert problem["field"] == "body"


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"expression": "x", "variables": {"x": [[1.0, 2.0], [3.0]]}}, "shape_error", "variables.x"),
        ({"expression": "x", "variables": {"x": ["one"]}}, "invalid_request", "variables.x"),
        ({"expression": "x", "variables": {"x": True}}, "invalid_request", "variables.x"),
        (
            {"expression": "x", "variables": {"x": {"dtype": "float32", "shape": [2], "b64": "AAAA"}}},
            "invalid_request",
            "variables.x.b64",
        ),  # fmt: skip
        (
            {"expression": "x", "variables": {"x": {"dtype": "complex64", "shape": [1], "b64": ""}}},
            "invalid_request",
            "variables.x.dtype",
        ),  # fmt: skip
        ({"expression": "x", "variables": {"x": 1.0}, "wrt": ["y"]}, "invalid_request", "wrt"),
        ({"expression": "x", "variables": {"x": 1.0}, "derivatives": ["hvp"]}, "invalid_request", "tangents"),
        (
            {
                "expression": "x",
                "variables": {"x": [1.0, 2.0]},
                "derivatives": ["jvp"],
                "tangents": {"x": [1.0]},
            },
            "shape_error",
            "tangents.x",
        ),  # fmt: skip
        (
            {"expression": "x", "variables": {"x": 1.0}, "derivatives": ["vjp"]},
            "invalid_request",
            "cotangent",
        ),
        ({"expression": "x", "variables": {"x": 1.0}, "cotangent": 1.0}, "invalid_request", "cotangent"),
        ({"expression": "x*y", "variables": {"x": 1.0, "y": 2.0}, "order": 2}, "invalid_request", "order"),
        ({"expression": "x", "variables": {"x": 1.0}, "timeout_s": 60}, "invalid_request", "timeout_s"),
        ({"expression": "x", "variables": {"x": 1.0}, "batch": True}, "shape_error", "variables.x"),
        (
            {"expression": "x+y", "variables": {"x": [1.0, 2.0], "y": [1.0]}, "batch": True},
            "shape_error",
            "variables.y",
        ),
        ({"expression": "x", "variables": {"sum": 1.0}}, "invalid_request", "variables.sum"),
        (
            {"expression": "x", "variables": {"x": 1.0}, "constants": {"x": 2.0}},
            "invalid_request",
            "constants.x",
        ),
    ],
)
def test_request_content_errors(client: TestClient, body: dict[str, Any], code: str, field: str) -> None:
    problem = assert_problem(post(client, body), 422, code)
    assert problem["field"] == field


def test_order_too_high(client: TestClient) -> None:
    problem = assert_problem(
        post(client, {"expression": "x", "variables": {"x": 1.0}, "order": 5}), 422, "limit_exceeded"
    )
    assert problem["limit"] == "max_order"


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (Timeout("the computation exceeded its 10 s deadline"), 504, "timeout"),
        (WorkerCrashed("the worker died (SIGKILL)"), 503, "worker_crashed"),
        (EvaluationError("cholesky needs a positive-definite matrix"), 422, "evaluation_error"),
        (TapeserveError("engine bug"), 500, "internal_error"),
    ],
)
def test_pool_errors_pass_through(
    client: TestClient, fake_pool: FakePool, error: TapeserveError, status: int, code: str
) -> None:
    fake_pool.error = error
    problem = assert_problem(post(client, {"expression": "x", "variables": {"x": 1.0}}), status, code)
    assert problem["detail"] == error.detail


def test_overloaded_has_retry_after(client: TestClient, fake_pool: FakePool) -> None:
    error = Overloaded("queue full")
    error.retry_after = 2.5  # type: ignore[attr-defined]
    fake_pool.error = error
    response = post(client, {"expression": "x", "variables": {"x": 1.0}})
    assert_problem(response, 503, "overloaded")
    assert response.headers["retry-after"] == "3"


def test_overloaded_default_retry_after(client: TestClient, fake_pool: FakePool) -> None:
    fake_pool.error = Overloaded("queue full")
    response = post(client, {"expression": "x", "variables": {"x": 1.0}})
    assert response.headers["retry-after"] == "1"


def test_unexpected_exception_is_a_500_without_traceback(
    client: TestClient, fake_pool: FakePool, caplog: pytest.LogCaptureFixture
) -> None:
    fake_pool.error = ZeroDivisionError("secret internals")
    response = post(client, {"expression": "x", "variables": {"x": 1.0}})
    problem = assert_problem(response, 500, "internal_error")
    assert "secret" not in response.text
    assert "ZeroDivisionError" not in response.text
    assert "logged" in problem["detail"]
    assert any("ZeroDivisionError" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_unknown_route_is_a_problem(client: TestClient) -> None:
    problem = assert_problem(client.get("/v2/nothing"), 404, "not_found")
    assert problem["instance"] == "/v2/nothing"


def test_wrong_method_is_a_problem(client: TestClient) -> None:
    response = client.get("/v1/gradient")
    assert_problem(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


def test_pool_receives_the_job(client: TestClient, fake_pool: FakePool) -> None:
    body = {
        "expression": "sum(f(x) * c)",
        "variables": {"x": [1.0, 2.0]},
        "constants": {"c": [3.0, "Infinity"]},
        "functions": {"f": {"params": ["a"], "body": "a**2", "gradient": {"a": "2*a*dy"}, "doc": "square"}},
        "derivatives": ["gradient", "hessian", "gradient"],
        "dtype": "float64",
        "timeout_s": 5,
    }
    response = post(client, body)
    assert response.status_code == 200, response.text
    job = fake_pool.jobs[-1]
    assert job.derivatives == ("gradient", "hessian")
    assert job.dtype == "float64"
    assert job.variables["x"].dtype.name == "float64"
    assert job.constants["c"][1] == float("inf")
    assert job.functions == {"f": {"params": ["a"], "body": "a**2", "gradient": {"a": "2*a*dy"}}}
    assert fake_pool.calls[-1] == {"timeout_s": 5, "affinity": job.signature()}
    data = response.json()
    assert set(data) == {"value", "gradient", "hessian", "dtype", "meta"}
    assert data["hessian"]["x"]["x"] == [[0.0, 0.0], [0.0, 0.0]]
    assert data["meta"]["cache"] == "miss"
    assert data["meta"]["compute_ms"] == 0.5


def test_unversioned_alias(client: TestClient) -> None:
    response = post(client, {"expression": "x", "variables": {"x": 1.0}}, path="/gradient")
    assert response.status_code == 200
    assert response.json()["gradient"] == {"x": 0.0}


def test_base64_response(client: TestClient) -> None:
    response = post(client, {"expression": "x", "variables": {"x": [1.0, 2.0]}, "encoding": "base64"})
    assert response.status_code == 200
    assert response.json()["gradient"]["x"] == {"dtype": "float32", "shape": [2], "b64": "AAAAAAAAAAA="}


def test_functions_listing(client: TestClient) -> None:
    response = client.get("/v1/functions")
    assert response.status_code == 200
    data = response.json()
    names = {f["name"] for f in data["functions"]}
    assert {"sum", "einsum", "where", "clip_gradient", "stop_gradient", "logsumexp"} <= names
    for item in data["functions"]:
        assert item["signature"].startswith(item["name"] + "(")
        assert item["doc"] and "\n" not in item["doc"]
        assert item["category"]
    assert {c["name"]: c["value"] for c in data["constants"]}["inf"] == "Infinity"
    assert any("indexing" in line for line in data["syntax"])


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_follows_the_pool(client: TestClient, fake_pool: FakePool) -> None:
    fake_pool.is_ready = False
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "starting"
    fake_pool.is_ready = True
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["pool"]["workers"][0]["device"] == "cpu"


@pytest.mark.parametrize("path", ["/v1/gradient", "/v1/step", "/v1/model/gradient"])
def test_a_deadline_below_the_floor_is_refused_before_any_work(
    client: TestClient, fake_pool: FakePool, path: str
) -> None:
    body: dict[str, Any] = {"expression": "sum(x**2)", "variables": {"x": [1.0]}, "timeout_s": 0.001}
    if path == "/v1/model/gradient":
        body = {"model": {"input_shape": [1], "layers": [{"type": "dense", "units": 1}]}, "x": [[1.0]],
                "y": [[1.0]], "timeout_s": 0.001}  # fmt: skip
    problem = assert_problem(client.post(path, json=body), 422, "invalid_request")
    assert "timeout_s" in problem["detail"] + str(problem.get("field")) and "0.1" in problem["detail"]
    assert fake_pool.jobs == [] and fake_pool.calls == []


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (Quarantined("this program crashed a worker", retry_after=42, until=1.0e9), 422, "quarantined"),
        (MemoryLimitExceeded("the computation needed more memory than allowed"), 422, "memory_limit"),
    ],
)
def test_isolation_problems_render_with_their_codes(
    client: TestClient, fake_pool: FakePool, error: TapeserveError, status: int, code: str
) -> None:
    fake_pool.error = error
    response = post(client, {"expression": "sum(x**2)", "variables": {"x": [1.0]}})
    body = assert_problem(response, status, code)
    if code == "quarantined":
        assert response.headers["retry-after"] == "42" and body["until"] == 1.0e9
