"""hello: ``square(x) = x * x`` and ``double(x)``, its gradient (2x)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from examples.gradbench import DTYPE, Evaluate
from service.client import Client

EXPRESSION = "x * x"


def square(client: Client, input: Any) -> float:
    return float(client.compute(EXPRESSION, {"x": float(input)}, derivatives=(), dtype=DTYPE).value)


def double(client: Client, input: Any) -> float:
    return float(client.gradient(EXPRESSION, {"x": float(input)}, dtype=DTYPE)["x"])


FUNCTIONS: Mapping[str, Evaluate] = {"square": square, "double": double}
