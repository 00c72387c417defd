"""Hostile requests against a real server: each is a 4xx problem+json, and the service keeps answering."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import LiveServer

X = {"x": [1.0, 2.0]}

HOSTILE: list[tuple[str, dict[str, Any] | bytes, set[str]]] = [
    ("eval", {"expression": "eval('1')", "variables": X}, {"unknown_name", "invalid_argument"}),
    (
        "import",
        {"expression": "__import__('os').system('true')", "variables": X},
        {"unknown_name", "parse_error"},
    ),
    ("import statement", {"expression": "import os", "variables": X}, {"parse_error"}),
    ("attribute", {"expression": "x.__class__", "variables": X}, {"parse_error", "unsupported_operation"}),
    ("dunder name", {"expression": "__builtins__", "variables": X}, {"unknown_name", "parse_error"}),
    ("lambda", {"expression": "(lambda: 1)()", "variables": X}, {"parse_error"}),
    ("exec semicolon", {"expression": "x; exec('1')", "variables": X}, {"parse_error"}),
    ("f-string", {"expression": "f'{x}'", "variables": X}, {"parse_error"}),
    ("dunder variable", {"expression": "x", "variables": {"__class__": 1.0}}, {"invalid_request"}),
    ("deep parens", {"expression": "(" * 10_000 + "x" + ")" * 10_000, "variables": X}, {"limit_exceeded"}),
    ("deep calls", {"expression": "sin(" * 5_000 + "x" + ")" * 5_000, "variables": X}, {"limit_exceeded"}),
    ("deep brackets", {"expression": "[" * 10_000 + "]" * 10_000, "variables": X}, {"limit_exceeded"}),
    ("unary chain", {"expression": "-" * 10_000 + "x", "variables": X}, {"limit_exceeded"}),
    (
        "giant literal",
        {"expression": "x * 1" + "0" * 5_000, "variables": X},
        {"limit_exceeded", "parse_error"},
    ),
    (
        "huge broadcast",
        {"expression": "sum(x[:, None] * x[None, :])", "variables": {"x": [0.0] * 100_000}},
        {"limit_exceeded"},
    ),  # fmt: skip
    (
        "huge reshape",
        {"expression": "sum(broadcast_to(x, (100000, 100000)))", "variables": X},
        {"limit_exceeded", "shape_error"},
    ),  # fmt: skip
    (
        "recursive function",
        {"expression": "f(x)", "variables": X, "functions": {"f": {"params": ["a"], "body": "f(a)"}}},
        {"invalid_argument", "invalid_request"},
    ),  # fmt: skip
    (
        "exponential inlining",
        {
            "expression": "f9(x)",
            "variables": X,
            "functions": {
                "f0": {"params": ["a"], "body": "a*a"},
                **{
                    f"f{i}": {"params": ["a"], "body": f"f{i - 1}(a)+f{i - 1}(a)+f{i - 1}(a)"}
                    for i in range(1, 10)
                },
            },
        },
        {"limit_exceeded"},
    ),  # fmt: skip
    ("unknown name", {"expression": "sum(y)", "variables": X}, {"unknown_name"}),
    (
        "wrong shapes",
        {"expression": "x @ y", "variables": {"x": [1.0, 2.0], "y": [1.0, 2.0, 3.0]}},
        {"shape_error"},
    ),
    ("ragged", {"expression": "sum(x)", "variables": {"x": [[1.0], [1.0, 2.0]]}}, {"shape_error"}),
    (
        "nan strings are fine but junk strings are not",
        {"expression": "sum(x)", "variables": {"x": ["nan"]}},
        {"invalid_request"},
    ),  # fmt: skip
    ("malformed json", b'{"expression": "x", "variables": {"x": [1, 2}', {"invalid_request"}),
    ("NaN literal", b'{"expression": "x", "variables": {"x": NaN}}', {"invalid_request"}),
    ("huge number", b'{"expression": "x", "variables": {"x": 1e999}}', {"invalid_request"}),
    ("not an object", b"[]", {"invalid_request"}),
    ("empty body", b"", {"invalid_request"}),
    ("binary junk", bytes(range(256)), {"invalid_request"}),
    (
        "deep json",
        b'{"expression": "x", "variables": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        {"invalid_request", "shape_error"},
    ),  # fmt: skip
]


@pytest.mark.parametrize(("name", "body", "codes"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_is_a_4xx_problem(
    live_server: LiveServer, name: str, body: dict[str, Any] | bytes, codes: set[str]
) -> None:
    url = f"{live_server.url}/v1/gradient"
    if isinstance(body, bytes):
        response = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        response = httpx.post(url, json=body, timeout=60)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] in codes, problem
    assert "Traceback" not in response.text
    assert httpx.get(f"{live_server.url}/healthz", timeout=10).status_code == 200


def test_service_still_computes_after_the_hostile_requests(ready_server: LiveServer) -> None:
    response = httpx.post(
        f"{ready_server.url}/v1/gradient", json={"expression": "x**2", "variables": {"x": 3.0}}, timeout=60
    )
    assert response.status_code == 200, response.text
    assert response.json()["gradient"] == {"x": 6.0}


def test_power_towers_are_float_arithmetic_not_big_ints(ready_server: LiveServer) -> None:
    # 10**10**10 would be a 10-billion-digit integer in Python; here it is float math and overflows.
    response = httpx.post(
        f"{ready_server.url}/v1/gradient",
        json={"expression": "x * 10**10**10", "variables": {"x": [1.0, 2.0]}},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["value"] == ["Infinity", "Infinity"]


# -- numbers on the wire: huge integers, booleans, empty tensors with huge dimensions ----------------

ZERO_HUGE = {"dtype": "float64", "shape": [0, 2**62, 2**62], "b64": ""}
MODEL = {"input_shape": [3], "seed": 1, "layers": [{"type": "dense", "units": 2}]}
UM_CONFIG = {"inputs": [{"name": "x", "size": 2}], "outputs": [{"expression": "x * 2", "size": 2}]}
UM_BASE = {"name": "expression", "config": UM_CONFIG, "input": [[1.0, 2.0]]}
# A small valid body per POST endpoint; the cases below put one hostile value into it.
BASES: dict[str, dict[str, Any]] = {
    "/v1/gradient": {"expression": "sum(x**2)", "variables": {"x": [1.0, 2.0]}},
    "/v1/step": {"expression": "sum(x**2)", "variables": {"x": [1.0, 2.0]}, "optimizer": {"type": "sgd"}},
    "/v1/model/describe": {"model": MODEL},
    "/v1/model/gradient": {"model": MODEL, "x": [[0.1, 0.2, 0.3]], "y": [[0.0, 1.0]]},
    "/v1/model/train-step": {
        "model": MODEL,
        "x": [[0.1, 0.2, 0.3]],
        "y": [[0.0, 1.0]],
        "optimizer": {"type": "sgd"},
    },
    "/umbridge/Evaluate": UM_BASE,
    "/umbridge/Gradient": {**UM_BASE, "outWrt": 0, "inWrt": 0, "sens": [1.0, 1.0]},
    "/umbridge/ApplyJacobian": {**UM_BASE, "outWrt": 0, "inWrt": 0, "vec": [1.0, 1.0]},
    "/umbridge/ApplyHessian": {
        **UM_BASE,
        "outWrt": 0,
        "inWrt1": 0,
        "inWrt2": 0,
        "sens": [1.0, 1.0],
        "vec": [1.0, 1.0],
    },  # fmt: skip
    "/umbridge/InputSizes": {"name": "expression", "config": UM_CONFIG},
    "/umbridge/OutputSizes": {"name": "expression", "config": UM_CONFIG},
    "/umbridge/ModelInfo": {"name": "expression"},
}


def _assert_refused(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """A 4xx with the request id in the header and the body: problem+json, or UM-Bridge's envelope."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    if status is not None:
        assert response.status_code == status, response.text[:500]
    request_id = response.headers["x-request-id"]
    assert response.headers.get("connection", "").lower() != "close"
    body: dict[str, Any] = response.json()
    if response.url.path.startswith("/umbridge/"):
        assert set(body) == {"error"} and body["error"]["type"] != "InternalError", body
        return body
    assert response.headers["content-type"] == "application/problem+json"
    assert isinstance(body["code"], str) and body["request_id"] == request_id, body
    return body


@pytest.fixture(scope="module")
def http(ready_server: LiveServer) -> Iterator[httpx.Client]:
    """One keep-alive connection: a refused request must leave it usable."""
    with httpx.Client(base_url=ready_server.url, timeout=60) as c:
        yield c


HUGE_DETAILS: list[tuple[str, str, dict[str, Any]]] = [
    ("order 4 on 100k elements", "/v1/gradient",
     {"expression": "sum(x**2)", "variables": {"x": [0.5] * 100_000}, "order": 4, "wrt": ["x"]}),
    ("base64 shape 2**40 x 2**40", "/v1/gradient",
     {"expression": "sum(x)", "variables": {"x": {"dtype": "float64", "shape": [2**40, 2**40], "b64": ""}}}),
    ("units 2**64-1", "/v1/model/describe",
     {"model": {**MODEL, "layers": [{"type": "dense", "units": 2**64 - 1}]}}),
    ("conv2d kernel 2**64-1", "/v1/model/describe",
     {"model": {"input_shape": [4, 4, 1], "layers": [
         {"type": "conv2d", "filters": 1, "kernel_size": [2**64 - 1, 1]}]}}),
    ("units 2**100", "/v1/model/gradient",
     {**BASES["/v1/model/gradient"], "model": {**MODEL, "layers": [{"type": "dense", "units": 2**100}]}}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "path", "body"), HUGE_DETAILS, ids=[h[0] for h in HUGE_DETAILS])
def test_huge_integers_in_details_are_problems_not_500(
    http: httpx.Client, name: str, path: str, body: dict[str, Any]
) -> None:
    problem = _assert_refused(http.post(path, json=body))
    assert problem["code"] in {"invalid_request", "limit_exceeded", "shape_error"}, problem
    for key, value in problem.items():
        assert not isinstance(value, int) or -(2**63) <= value < 2**64, (key, value)
    assert http.get("/healthz").status_code == 200  # the same connection still answers


def _with_tensor(path: str, tensor: Any) -> dict[str, Any]:
    body = dict(BASES[path])
    if path.startswith("/umbridge/"):
        body["input"] = [tensor]
    elif "variables" in body:
        body["variables"] = {"x": tensor}
    else:
        body["x"] = tensor
    return body


TENSOR_PATHS = [p for p in BASES if p != "/umbridge/ModelInfo" and "Sizes" not in p and "describe" not in p]


@pytest.mark.parametrize("path", TENSOR_PATHS)
def test_zero_element_tensor_with_huge_dimensions_is_refused(http: httpx.Client, path: str) -> None:
    body = _assert_refused(
        http.post(path, json=_with_tensor(path, ZERO_HUGE)), 422 if path[1] == "v" else 400
    )
    if "code" in body:
        assert body["code"] in {"limit_exceeded", "invalid_request"} and "x" in body["field"], body
    else:
        assert body["error"]["type"] == "InvalidInput", body


@pytest.mark.parametrize("tensor", [[True, 2.0], [2.0, False], [[1.0, 2.0], [True, 3.0]], [1, True]])
@pytest.mark.parametrize("path", ["/v1/gradient", "/v1/model/gradient", "/umbridge/Evaluate"])
def test_booleans_in_numeric_tensors_are_refused(http: httpx.Client, path: str, tensor: Any) -> None:
    if path == "/umbridge/Evaluate" and isinstance(tensor[0], list):
        tensor = tensor[1]
    body = _assert_refused(http.post(path, json=_with_tensor(path, tensor)), 422 if path[1] == "v" else 400)
    if "code" in body:
        assert (
            body["code"] == "invalid_request" and body["field"].endswith("x") and "boolean" in body["detail"]
        ), body
    else:
        assert body["error"]["type"] == "InvalidInput" and "boolean" in body["error"]["message"], body


# -- every integer field of every request schema, with integers beyond 64 bits -----------------------

_OPENAPI = json.loads((Path(__file__).parents[2] / "openapi" / "openapi.json").read_text())
Step = tuple[str, str, tuple[tuple[str, Any], ...]]  # ("key", name, tag) or ("item", "", ())


def _resolve(schema: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    ref = schema.get("$ref")
    if ref is None:
        return schema, None
    return _OPENAPI["components"]["schemas"][ref.rsplit("/", 1)[1]], ref


def _integer_fields(
    schema: dict[str, Any], path: tuple[Step, ...] = (), seen: frozenset[str] = frozenset()
) -> Iterator[tuple[Step, ...]]:
    schema, ref = _resolve(schema)
    if ref is not None:
        if ref in seen:
            return
        seen = seen | {ref}
    for key in ("allOf", "anyOf", "oneOf"):
        for branch in schema.get(key, []):
            yield from _integer_fields(branch, path, seen)
    if schema.get("type") == "integer":
        yield path
    properties = schema.get("properties", {})
    tag_schema = properties.get("type", {})
    tag_value = tag_schema.get("const", (tag_schema.get("enum") or [None, None])[0])
    if "const" not in tag_schema and len(tag_schema.get("enum", [])) != 1:
        tag_value = None
    tag = (("type", tag_value),) if tag_value is not None else ()
    for name, sub in properties.items():
        yield from _integer_fields(sub, (*path, ("key", name, tag)), seen)
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _integer_fields(schema["additionalProperties"], (*path, ("key", "x", tag)), seen)
    if isinstance(schema.get("items"), dict):
        yield from _integer_fields(schema["items"], (*path, ("item", "", ())), seen)


def _put(node: Any, steps: tuple[Step, ...], value: Any) -> Any:
    kind, name, tag = steps[0]
    rest = steps[1:]
    if kind == "item":
        items = list(node) if isinstance(node, list) and node else [None]
        items[0] = value if not rest else _put(items[0], rest, value)
        return items
    fits = isinstance(node, dict) and all(node.get(k) == v for k, v in tag)
    obj = dict(node) if fits else dict(tag)
    obj[name] = value if not rest else _put(obj.get(name), rest, value)
    return obj


INTEGER_FIELDS: list[tuple[str, tuple[Step, ...]]] = sorted(
    {
        (path, steps)
        for path, ops in _OPENAPI["paths"].items()
        for op in ops.values()
        for content in [op.get("requestBody", {}).get("content", {}).get("application/json")]
        if content
        for steps in _integer_fields(content["schema"])
    },
    key=repr,
)


def _field_id(case: tuple[str, tuple[Step, ...]]) -> str:
    path, steps = case
    return path + ":" + "".join(f".{s[1]}" if s[0] == "key" else "[]" for s in steps)


def test_the_walk_finds_the_integer_fields() -> None:
    ids = {_field_id(case) for case in INTEGER_FIELDS}
    assert "/v1/gradient:.order" in ids
    assert "/v1/gradient:.variables.x.shape[]" in ids
    assert "/v1/model/describe:.model.layers[].units" in ids
    assert "/umbridge/Gradient:.inWrt" in ids
    assert len(ids) > 20


@pytest.mark.parametrize("case", INTEGER_FIELDS, ids=[_field_id(c) for c in INTEGER_FIELDS])
def test_every_integer_field_refuses_integers_beyond_64_bits(
    http: httpx.Client, case: tuple[str, tuple[Step, ...]]
) -> None:
    path, steps = case
    for value in (2**64 - 1, 2**64, -(2**63) - 1):
        _assert_refused_or_ok(http.post(path, json=_put(BASES.get(path, {}), steps, value)))


def _assert_refused_or_ok(response: httpx.Response) -> None:
    if response.status_code == 200:  # a huge integer a field ignores (e.g. a seed taken modulo)
        return
    _assert_refused(response)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=st.sampled_from(INTEGER_FIELDS),
    value=st.one_of(
        st.integers(min_value=2**63, max_value=2**200), st.integers(min_value=-(2**200), max_value=-(2**63))
    ),
)
def test_huge_integers_anywhere_are_never_a_5xx(
    http: httpx.Client, case: tuple[str, tuple[Step, ...]], value: int
) -> None:
    path, steps = case
    _assert_refused_or_ok(http.post(path, json=_put(BASES.get(path, {}), steps, value)))


# -- non-finite scalars: the strings, in JSON bodies, histories and NDJSON lines; the SDK reads them ---

NONFINITE_STRINGS = {"NaN", "Infinity", "-Infinity"}
DIVERGING_STEP = {
    "expression": "sum(exp(x))",
    "variables": {"x": [1000.0, 2.0]},
    "optimizer": {"type": "sgd", "learning_rate": 0.1},
    "dtype": "float64",
}
DIVERGING_MODEL = {
    "model": MODEL,
    "x": [[1e200, 1e200, 1e200]],
    "y": [[0.0, 1.0]],
    "dtype": "float64",
}


def test_a_diverged_expression_step_answers_nonfinite_strings(http: httpx.Client) -> None:
    one = http.post("/v1/step", json=DIVERGING_STEP)
    assert one.status_code == 200, one.text[:500]
    assert one.json()["value"] == "Infinity" and one.json()["gradient_norm"] in NONFINITE_STRINGS
    response = http.post("/v1/step", json={**DIVERGING_STEP, "steps": 2})
    assert response.status_code == 200, response.text[:500]
    first = response.json()["history"][0]
    assert first["loss"] == "Infinity" and first["gradient_norm"] in NONFINITE_STRINGS, first


def test_a_diverged_model_answers_nonfinite_strings(http: httpx.Client) -> None:
    response = http.post("/v1/model/gradient", json=DIVERGING_MODEL)
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    assert body["loss"] in NONFINITE_STRINGS and body["data_loss"] in NONFINITE_STRINGS, body
    train = http.post("/v1/model/train-step", json={**DIVERGING_MODEL, "optimizer": {"type": "sgd"}})
    assert train.status_code == 200, train.text[:500]
    assert train.json()["loss"] in NONFINITE_STRINGS


def test_streamed_progress_lines_carry_nonfinite_strings(http: httpx.Client) -> None:
    body = {**DIVERGING_STEP, "steps": 3, "stream": True}
    response = http.post("/v1/step", json=body)
    assert response.status_code == 200, response.text[:500]
    lines = [json.loads(line) for line in response.text.splitlines() if line]
    progress = [line for line in lines if line["type"] == "progress"]
    assert progress and progress[0]["loss"] == "Infinity", progress
    assert lines[-1]["type"] == "result" and lines[-1]["history"][0]["loss"] == "Infinity", lines[-1]


def test_the_sdk_turns_nonfinite_strings_back_into_floats(ready_server: LiveServer) -> None:
    import math

    import service.client as ts

    with ts.Client(ready_server.url, retry=ts.Retry(attempts=0)) as client:
        grads = client.model_gradient(MODEL, DIVERGING_MODEL["x"], DIVERGING_MODEL["y"], dtype="float64")
        assert not math.isfinite(grads.loss) and not math.isfinite(grads.data_loss)
        one = client.step(
            DIVERGING_STEP["expression"], {"x": [1000.0, 2.0]}, optimizer="sgd", dtype="float64"
        )
        assert one.value == math.inf
        two = client.step(
            DIVERGING_STEP["expression"], {"x": [1000.0, 2.0]}, optimizer="sgd", steps=2, dtype="float64"
        )
        assert two.history is not None and two.history[0].loss == math.inf
