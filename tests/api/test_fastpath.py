"""The raw-ASGI fast path for /v1/gradient answers exactly as the FastAPI route does, only sooner."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api import Settings, create_app, fastpath
from tests.api.conftest import SMALL_LIMITS
from tests.api.fakes import FakePool

GOOD = {
    "expression": "sum(x**2) + c",
    "variables": {"x": [1.0, 2.0, 3.0]},
    "constants": {"c": 1.5},
    "derivatives": ["gradient", "hessian"],
    "dtype": "float64",
}


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, per POST the fast path considered, whether it validated the body itself."""
    calls: list[bool] = []
    validate = fastpath._validate

    def spy(model: Any, body: bytes) -> Any:
        parsed = validate(model, body)
        calls.append(parsed is not None)
        return parsed

    monkeypatch.setattr(fastpath, "_validate", spy)
    return calls


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = create_app(Settings(**SMALL_LIMITS), pool=FakePool())
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _without_timing(body: dict[str, Any]) -> dict[str, Any]:
    body = dict(body)
    body.pop("request_id", None)
    if "meta" in body:
        body["meta"] = {k: v for k, v in body["meta"].items() if k != "total_ms"}
    return body


def _through_fastapi(client: TestClient, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> Any:
    with monkeypatch.context() as m:
        m.setattr(fastpath, "_validate", lambda model, body: None)  # every body handed to the route
        return client.post("/v1/gradient", **kwargs)


def test_valid_requests_take_the_fast_path_and_answer_as_the_route_does(
    client: TestClient, seen: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    for path in ("/v1/gradient", "/gradient"):
        fast = client.post(path, json=GOOD)
        assert fast.status_code == 200, fast.text
        assert fast.headers["content-type"] == "application/json" and "x-request-id" in fast.headers
    assert seen == [True, True]
    slow = _through_fastapi(client, monkeypatch, json=GOOD)
    assert slow.status_code == 200
    assert _without_timing(fast.json()) == _without_timing(slow.json())
    assert fast.json()["hessian"]["x"]["x"] == [[0.0] * 3] * 3  # the fake pool's zeros, rendered


@pytest.mark.parametrize(
    ("kwargs", "validated"),
    [
        ({"content": b'{"expression": "x", '}, False),  # malformed JSON
        ({"content": b""}, False),  # no body
        ({"json": {"expression": "x", "bogus": 1}}, False),  # unknown field
        ({"json": {**GOOD, "derivatives": ["gradient", "laplacian"]}}, False),  # not a derivative
        ({"json": [1, 2, 3]}, False),  # not an object
        ({"json": {"expression": "x", "variables": {"x": "one"}}}, True),  # the endpoint decodes tensors
    ],
)
def test_invalid_bodies_get_the_routes_own_problem(
    client: TestClient,
    seen: list[bool],
    monkeypatch: pytest.MonkeyPatch,
    kwargs: dict[str, Any],
    validated: bool,
) -> None:
    headers = {"content-type": "application/json"}
    fast = client.post("/v1/gradient", headers=headers, **kwargs)
    assert seen == [validated]  # schema errors are handed to the route; value errors raised by the endpoint
    slow = _through_fastapi(client, monkeypatch, headers=headers, **kwargs)
    assert fast.status_code == slow.status_code and 400 <= fast.status_code < 500
    assert fast.headers["content-type"] == "application/problem+json"
    assert _without_timing(fast.json()) == _without_timing(slow.json())


def test_non_json_bodies_never_reach_the_fast_path(client: TestClient, seen: list[bool]) -> None:
    r = client.post("/v1/gradient", content=b"expression=x", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type"
    assert seen == []


def test_errors_raised_by_the_endpoint_are_problems_with_path_and_request_id(
    client: TestClient, seen: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {**GOOD, "expression": "sum(x**2) + nosuch(x)"}
    fast = client.post("/v1/gradient", json=body, headers={"x-request-id": "fast-1"})
    assert seen == [True]  # valid JSON and schema: the error comes from the endpoint's own checks
    assert fast.status_code == 400 and fast.headers["content-type"] == "application/problem+json"
    problem = fast.json()
    assert problem["code"] == "unknown_name" and problem["instance"] == "/v1/gradient"
    assert problem["request_id"] == "fast-1" and fast.headers["x-request-id"] == "fast-1"
    slow = _through_fastapi(client, monkeypatch, json=body, headers={"x-request-id": "fast-1"})
    assert slow.json() == problem


def test_auth_and_body_limits_still_apply() -> None:
    settings = Settings(**{**SMALL_LIMITS, "api_keys": "s3cret"})
    with TestClient(create_app(settings, pool=FakePool()), raise_server_exceptions=False) as c:
        assert c.post("/v1/gradient", json=GOOD).status_code == 401
        ok = c.post("/v1/gradient", json=GOOD, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        huge = {**GOOD, "expression": "x" * (SMALL_LIMITS["max_body_bytes"] + 1)}
        big = c.post("/v1/gradient", json=huge, headers={"authorization": "Bearer s3cret"})
        assert big.status_code == 413 and big.json()["code"] == "payload_too_large"


def test_train_steps_take_the_fast_path_unless_they_stream() -> None:
    from service.api.endpoints import fast_endpoints
    from service.api.model_schemas import TrainStepRequest

    FAST_TRAIN_STEP = fast_endpoints()["/v1/model/train-step"]

    base = {"model": {"input_shape": [2], "layers": [{"type": "dense", "units": 1}]}, "x": [[1.0, 2.0]],
            "y": [[0.5]], "loss": "mse", "optimizer": {"type": "sgd", "learning_rate": 0.1}}  # fmt: skip
    assert FAST_TRAIN_STEP.accepts is not None
    for extra, fast in (({}, True), ({"steps": 3}, True), ({"steps": 3, "stream": True}, False),
                        ({"steps": 1, "stream": True}, True)):  # fmt: skip
        body = TrainStepRequest.model_validate({**base, **extra})
        assert FAST_TRAIN_STEP.accepts(body) is fast, extra
