"""GET /v1/functions: the expression language's reference."""

from __future__ import annotations

import math
from functools import cache

from fastapi import APIRouter

from service.api.deps import TapeserveRoute
from service.api.schemas import ConstantInfo, FunctionInfo, FunctionsResponse
from service.expr import BUILTINS, CONSTANTS
from service.expr.program import FORMS

__all__ = ["SYNTAX", "router"]

router = APIRouter(route_class=TapeserveRoute, tags=["language"])

SYNTAX: tuple[str, ...] = (
    "numbers: 3, 2.5, 1e-3; the constants pi, e, inf",
    "arithmetic: + - * / // % ** @ and unary -, with numpy broadcasting",
    "comparisons: == != < <= > >= give booleans, usable in where() and as 0/1 masks in arithmetic",
    "logic: and, or, not on booleans; a if condition else b (elementwise, like where)",
    "indexing: x[0], x[-1], x[1:], x[::2], x[:, None] (new axis), x[..., 0]",
    "calls: f(a, b), keyword arguments such as sum(x, axis=0, keepdims=True)",
    "names: the request's variables and constants, its functions, and the built-ins listed here",
    "gradient control: stop_gradient(x); clip_gradient(x, lo, hi)",
    "user functions: {name: {params, body, gradient?}}; gradient expressions see the params, y and dy",
    *(f"{form.signature}: {form.doc}" for form in FORMS.values()),
)


@cache
def _reference() -> FunctionsResponse:
    return FunctionsResponse(
        functions=[
            FunctionInfo(name=b.name, signature=b.signature, category=b.category, doc=b.doc)
            for b in sorted(BUILTINS.values(), key=lambda b: (b.category, b.name))
        ],
        constants=[
            ConstantInfo(name=name, value=value if math.isfinite(value) else "Infinity")
            for name, value in CONSTANTS.items()
        ],
        syntax=list(SYNTAX),
    )


@router.get("/v1/functions", operation_id="list_functions", response_model=FunctionsResponse)
async def list_functions() -> FunctionsResponse:
    """List every built-in function with its signature, the constants, and the syntax."""
    return _reference()
