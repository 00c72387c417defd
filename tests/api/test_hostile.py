"""Hostile requests against a real server: each is a 4xx problem+json, and the service keeps answering."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

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
