"""The expression builder: rendered text parses with the server's parser and, on a live server, evaluates
to what numpy computes with the same Python operators (hypothesis-generated operator trees)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import service.client as ts
from service.client import _functions
from service.client._builder import as_expr
from service.expr import BUILTINS, parse_expression
from service.limits import Limits
from tests.conftest import LiveServer

x, y = ts.Var("x"), ts.Var("y")
X = np.array([0.3, -1.2, 2.5])
Y = np.array([-0.7, 0.4, 1.1])


@pytest.mark.parametrize(
    ("expr", "text"),
    [
        (-(x**2), "-x ** 2"),
        ((-x) ** 2, "(-x) ** 2"),
        (2**-x, "2 ** -x"),
        ((x**2) ** 3, "(x ** 2) ** 3"),
        (x ** (y**2), "x ** y ** 2"),
        (x - (y - x), "x - (y - x)"),
        ((x - y) - x, "x - y - x"),
        (x / (y * x), "x / (y * x)"),
        (x * -2, "x * -2"),
        ((-2.5) ** x, "(-2.5) ** x"),
        (1e-5 * x, "1e-05 * x"),
        (x[1:] - x[:-1], "x[1:] - x[:-1]"),
        (x[..., None, ::2], "x[..., None, ::2]"),
        ((x + y)[0], "(x + y)[0]"),
        ((x < 1) + 1, "(x < 1) + 1"),
        (~(x < 1) & (y > 0), "not x < 1 and y > 0"),
        (1 + ~(x < 1), "1 + (not x < 1)"),
        ((x < y) | (x > 2), "x < y or x > 2"),
        (x.if_else(x > 0, -x), "x if x > 0 else -x"),
        (ts.sum(x * y, axis=0, keepdims=True), "sum(x * y, axis=0, keepdims=True)"),
        (x.T @ y, "transpose(x) @ y"),
        (ts.einsum("i,i->", x, y), 'einsum("i,i->", x, y)'),
        (x.eq(y), "x == y"),
        (abs(x - float("inf")), "abs(x - inf)"),
        (np.float64(2.0) * x, "2.0 * x"),
    ],
)
def test_rendering_and_precedence(expr: ts.Expr, text: str) -> None:
    assert str(expr) == text
    parse_expression(text, Limits())  # the server's parser takes it


def test_values_that_have_no_literal_are_refused() -> None:
    with pytest.raises(ValueError, match="NaN"):
        _ = x + float("nan")
    with pytest.raises(TypeError, match="variables or constants"):
        _ = x + np.ones(3)
    with pytest.raises(ValueError, match="not a valid name"):
        ts.Var("if")
    with pytest.raises(TypeError, match="truth value"):
        bool(x < y)


def test_the_function_namespace_is_the_servers_table() -> None:
    assert set(_functions.__all__) == set(BUILTINS)
    for name in BUILTINS:
        assert getattr(ts, name).signature == BUILTINS[name].signature


# -- random operator trees, built twice: as Expr and as numpy values -----------------------------------

Pair = tuple[ts.Expr, Any]  # (expression, numpy value)

_UNARY: list[tuple[Callable[[Any], Any], Callable[[Any], Any]]] = [
    (lambda e: -e, lambda v: -v),
    (ts.tanh, np.tanh),
    (ts.sin, np.sin),
    (lambda e: ts.exp(ts.tanh(e)), lambda v: np.exp(np.tanh(v))),
    (lambda e: e**2, lambda v: v**2),
    (lambda e: (1 + e * e) ** -1.5, lambda v: (1 + v * v) ** -1.5),
    (lambda e: (e > 0.1) * e, lambda v: (v > 0.1) * v),
    (lambda e: (e + x)[::-1], lambda v: (v + X)[::-1]),
]
_BINARY: list[tuple[Callable[[Any, Any], Any], Callable[[Any, Any], Any]]] = [
    (lambda a, b: a + b, lambda a, b: a + b),
    (lambda a, b: a - b, lambda a, b: a - b),
    (lambda a, b: a * b, lambda a, b: a * b),
    (lambda a, b: a / (1 + b * b), lambda a, b: a / (1 + b * b)),
    (lambda a, b: ts.where(a < b, a, -b), lambda a, b: np.where(a < b, a, -b)),
    (lambda a, b: ts.where(~(a > b) | (b > 1), b, a), lambda a, b: np.where(~(a > b) | (b > 1), b, a)),
    (lambda a, b: (a + b).if_else(a >= b, a - b), lambda a, b: np.where(a >= b, a + b, a - b)),
]


def _leaves() -> st.SearchStrategy[Pair]:
    numbers = st.floats(-3, 3, allow_nan=False, allow_subnormal=False) | st.integers(-3, 3)
    return st.sampled_from([(x, X), (y, Y)]) | numbers.map(lambda c: (as_expr(c), np.float64(c)))


def _extend(children: st.SearchStrategy[Pair]) -> st.SearchStrategy[Pair]:
    unary = st.tuples(st.sampled_from(_UNARY), children).map(lambda t: (t[0][0](t[1][0]), t[0][1](t[1][1])))
    binary = st.tuples(st.sampled_from(_BINARY), children, children).map(
        lambda t: (t[0][0](t[1][0], t[2][0]), t[0][1](t[1][1], t[2][1]))
    )
    return unary | binary


TREES = st.recursive(_leaves(), _extend, max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(TREES)
def test_random_trees_render_to_text_the_server_parses(pair: Pair) -> None:
    parse_expression(str(pair[0]), Limits())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TREES)
def test_random_trees_evaluate_like_numpy_on_a_live_server(ready_server: LiveServer, pair: Pair) -> None:
    expr, expected = pair
    with ts.Client(ready_server.url) as client:
        result = client.compute(expr, derivatives=[], dtype="float64", x=X, y=Y)
    np.testing.assert_allclose(
        result.value, np.broadcast_to(expected, result.value.shape), rtol=1e-10, atol=1e-12
    )
