"""Hypothesis-generated hostile requests to POST /v1/gradient on a real server (real worker, real TF).

Token soups from the language's alphabet, deep and huge inputs, non-finite strings, wrong types:
every answer must be 2xx or a 4xx problem+json with a stable code, never a 5xx, and the worker must
never crash (its restarts stay 0 in /readyz).
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.expr.functions import BUILTINS, CONSTANTS
from tests.ops.conftest import restarts

pytestmark = pytest.mark.timeout(600)

# Bounded so the whole file runs in well under a minute on a busy 2-core machine.
_EXAMPLES = 120
_SETTINGS = settings(
    max_examples=_EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
    database=None,
)

_NAMES = ["x", "y", "c", "f", "_", "__class__", "__import__", "lambda", "import", "os"]
_OPERATORS = ["+", "-", "*", "/", "//", "%", "**", "@", "==", "!=", "<", "<=", ">", ">=", "~", "&", "|", "^"]
_PUNCTUATION = ["(", ")", "[", "]", ",", ":", "::", "...", ".", ";", "=", "'", '"', "{", "}", "\\", "#"]
_KEYWORDS = ["if", "else", "and", "or", "not", "None", "True", "False", "for", "in", "axis=", "keepdims="]
_NUMBERS = [
    "0",
    "1",
    "2",
    "-1",
    "0.5",
    "1e308",
    "1e-320",
    "1e999",
    "nan",
    "inf",
    "1" * 60,
    "0x1f",
    "1_000",
    "1j",
]
_WEIRD = [" ", "\n", "\t", "\x00", "é", "∑", "\u202e", "😀"]
TOKENS = (
    sorted(BUILTINS) + sorted(CONSTANTS) + _NAMES + _OPERATORS + _PUNCTUATION + _KEYWORDS + _NUMBERS + _WEIRD
)

token_soup = st.lists(st.sampled_from(TOKENS), min_size=0, max_size=40).map(" ".join) | st.lists(
    st.sampled_from(TOKENS), max_size=40
).map("".join)
# Mostly well-formed expressions with a random twist, so a fair share reach the worker and TF.
well_formed = st.builds(
    lambda fn, op, k, axis: f"{fn}(x {op} {k}{axis})",
    st.sampled_from([b for b in sorted(BUILTINS)]),
    st.sampled_from(["+", "*", "/", "**", "@", "-"]),
    st.sampled_from(["x", "y", "2", "0", "-1.5", "1e308", "c"]),
    st.sampled_from(["", ", 0", ", axis=0", ", -1", ", (0, 1)", ", 'fro'", ", None", ", 100"]),
)
expressions = token_soup | well_formed | st.text(max_size=200)

_NON_FINITE = st.sampled_from(["NaN", "Infinity", "-Infinity", "nan", "inf", "", "1e999"])
scalars = (
    st.floats(allow_nan=False, allow_infinity=False, width=64) | st.integers(-(2**70), 2**70) | _NON_FINITE
)
wrong_types: st.SearchStrategy[Any] = (
    st.none()
    | st.booleans()
    | st.text(max_size=5)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)


def _b64(data: Any) -> dict[str, Any]:
    dtype, shape, raw = data
    return {"dtype": dtype, "shape": shape, "b64": base64.b64encode(raw).decode()}


b64_tensors = st.tuples(
    st.sampled_from(["float32", "float64", "int32", "bool", "float16", "complex64", "object", ""]),
    st.lists(st.integers(-2, 5), max_size=4),
    st.binary(max_size=64),
).map(_b64)
tensors: st.SearchStrategy[Any] = (
    st.recursive(
        scalars | wrong_types,
        lambda inner: st.lists(inner, max_size=4),
        max_leaves=24,
    )
    | b64_tensors
)


requests_: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {"expression": expressions, "variables": st.fixed_dictionaries({"x": tensors})},
    optional={
        "constants": st.fixed_dictionaries({"c": tensors}),
        "derivatives": st.lists(
            st.sampled_from(["gradient", "jacobian", "hessian", "hvp", "jvp", "vjp", "value", 7]), max_size=3
        ),
        "dtype": st.sampled_from(["float32", "float64", "int32", "float16", None, 3]),
        "order": st.integers(-1, 9),
        "batch": st.booleans() | st.just("yes"),
        "wrt": st.lists(st.sampled_from(["x", "c", "y", ""]), max_size=2),
        "encoding": st.sampled_from(["json", "base64", "xml"]),
        # Never a small positive deadline: a 504 for it would be the documented answer, not a fault.
        "timeout_s": st.floats(10, 30) | st.sampled_from([-1, 0, 1e9, "soon", None]),
        "unexpected": st.integers(),
    },
)


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:2000]}"
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json", response.text[:500]
        problem = response.json()
        assert problem["code"] and problem["detail"] and problem["status"] == response.status_code
        assert problem["request_id"] == response.headers["x-request-id"]


@pytest.fixture(scope="module", autouse=True)
def _no_worker_restarts(ops_client: httpx.Client) -> Any:
    before = restarts(ops_client)
    yield
    assert restarts(ops_client) == before, "a generated request crashed or wedged a worker"


@_SETTINGS
@given(expression=expressions)
def test_expression_soup(ops_client: httpx.Client, expression: str) -> None:
    _check(ops_client.post("/v1/gradient", json={"expression": expression, "variables": {"x": [1.0, 2.0]}}))


@_SETTINGS
@given(body=requests_)
def test_hostile_requests(ops_client: httpx.Client, body: dict[str, Any]) -> None:
    _check(ops_client.post("/v1/gradient", json=body))


@settings(max_examples=25, deadline=None, database=None)
@given(depth=st.integers(2, 5000), wide=st.integers(0, 20_000))
def test_deep_and_huge_tensors(ops_client: httpx.Client, depth: int, wide: int) -> None:
    # Written by hand: Python's json (and orjson) refuse to encode nesting this deep.
    deep = '{"expression": "sum(x)", "variables": {"x": ' + "[" * depth + "1.0" + "]" * depth + "}}"
    _check(
        ops_client.post("/v1/gradient", content=deep.encode(), headers={"Content-Type": "application/json"})
    )
    huge = np.ones(wide).tolist()
    _check(ops_client.post("/v1/gradient", json={"expression": "sum(x**2)", "variables": {"x": huge}}))


@settings(max_examples=40, deadline=None, database=None)
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_raw_bodies(ops_client: httpx.Client, raw: bytes) -> None:
    _check(ops_client.post("/v1/gradient", content=raw, headers={"Content-Type": "application/json"}))


def test_the_server_still_computes_correctly(ops_client: httpx.Client) -> None:
    # After all of the above, a plain request still gets the closed-form answer: 2x.
    r = ops_client.post(
        "/v1/gradient", json={"expression": "sum(x**2)", "variables": {"x": [1.5, -2.0]}, "dtype": "float64"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["gradient"]["x"] == [3.0, -4.0]
