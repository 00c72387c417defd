"""The SDK's request body: large base64 texts are spliced in after json.dumps, and the bytes are
exactly what json.dumps alone writes, whatever else the body holds."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from service.client._wire import dumps_body
from service.tensorcodec import encode_tensor

BIG = encode_tensor(np.random.default_rng(0).standard_normal(20_000), "base64")  # > 64 KiB of text
SMALL = encode_tensor(np.arange(3.0), "base64")


def _tensor(text: str) -> dict[str, Any]:
    return {"dtype": "float64", "shape": [1], "b64": text}


@pytest.mark.parametrize(
    "body",
    [
        {"expression": "sum(x)", "variables": {"x": BIG}, "dtype": "float64"},
        # strings that look like the placeholder's escape, quotes, backslashes, non-ASCII, NUL
        {
            "expression": '\x00 "\\u0000" \\ é',
            "variables": {"x": BIG, "y": SMALL, "z": [1.0, 2.0]},
            "constants": {"c": BIG, "\x00k": BIG},
            "tangents": {"x": BIG},
        },  # fmt: skip
        # long texts json.dumps must escape are left to it: a quote, a backslash, a control, non-ASCII
        {
            "variables": {
                "a": _tensor('A"' * 40_000),
                "b": _tensor("\\" * 70_000),
                "c": _tensor("A" * 70_000 + "\x01"),
                "d": _tensor("é" * 70_000),
            }
        },  # fmt: skip
        # a tensor-shaped dict anywhere (a list, a user function), and one with extra keys
        {
            "a": [BIG, {"k": BIG}],
            "functions": {"f": {"params": ["x"], "body": "x"}},
            "b": {**BIG, "extra": 1},
        },
        {"expression": "1"},
    ],
)
def test_same_bytes_as_json_dumps(body: dict[str, Any]) -> None:
    assert dumps_body(body) == json.dumps(body, allow_nan=False, separators=(",", ":")).encode()


def test_non_finite_floats_are_still_refused() -> None:
    with pytest.raises(ValueError):
        dumps_body({"variables": {"x": BIG}, "timeout_s": float("nan")})


def test_the_spliced_text_is_the_tensor() -> None:
    body = {"variables": {"x": BIG}}
    assert json.loads(dumps_body(body)) == body
