"""Expressions built from Python operators, rendered to tapeserve's expression language.

``x = Var("x"); f = (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()`` gives an ``Expr``
whose ``str()`` is text the server parses; ``client.gradient(f, x=array)`` sends it. Rendering knows
the language's precedence (the parser's grammar), so parentheses appear exactly where they must.
Nothing is checked here beyond what rendering needs: the server reports mistakes with a caret.
"""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Sequence
from typing import Union

import numpy as np

__all__ = ["Expr", "Operand", "Var", "call", "render"]

# Precedence levels, loosest to tightest, as in the parser's grammar (service/expr/parser.py).
_IF, _OR, _AND, _NOT, _CMP, _ARITH, _TERM, _UNARY, _POWER, _ATOM = range(10)
_BINARY_LEVEL = {"or": _OR, "and": _AND, "+": _ARITH, "-": _ARITH}
_BINARY_LEVEL.update(dict.fromkeys(("*", "/", "//", "%", "@"), _TERM))
_COMPARE = {"==", "!=", "<", "<=", ">", ">="}
_NAME = re.compile(r"[A-Za-z_][A-Za-z_0-9]*\Z")
_LANGUAGE_KEYWORDS = {"and", "or", "not", "if", "else", "True", "False", "None"}
# A string literal in the language is one line of plain characters (einsum subscripts, dtypes).
_PLAIN_STRING = re.compile(r"[^\"'\\\n]*\Z")


class Expr:
    """A piece of expression text with its precedence; operators build bigger expressions."""

    __slots__ = ("_level", "_text")
    __array_ufunc__ = None  # numpy scalars and arrays on the left defer to Expr's reflected operators

    def __init__(self, text: str, level: int = _ATOM) -> None:
        self._text = text
        self._level = level

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"Expr({self._text!r})"

    def __bool__(self) -> bool:
        raise TypeError(
            "an Expr has no truth value: use where(c, a, b) or a.if_else(...) instead of if/and/or/not, "
            "and & | ~ for logic"
        )

    # -- arithmetic -------------------------------------------------------------------------------

    def __add__(self, other: Operand) -> Expr:
        return _binary("+", self, other)

    def __radd__(self, other: Operand) -> Expr:
        return _binary("+", other, self)

    def __sub__(self, other: Operand) -> Expr:
        return _binary("-", self, other)

    def __rsub__(self, other: Operand) -> Expr:
        return _binary("-", other, self)

    def __mul__(self, other: Operand) -> Expr:
        return _binary("*", self, other)

    def __rmul__(self, other: Operand) -> Expr:
        return _binary("*", other, self)

    def __truediv__(self, other: Operand) -> Expr:
        return _binary("/", self, other)

    def __rtruediv__(self, other: Operand) -> Expr:
        return _binary("/", other, self)

    def __floordiv__(self, other: Operand) -> Expr:
        return _binary("//", self, other)

    def __rfloordiv__(self, other: Operand) -> Expr:
        return _binary("//", other, self)

    def __mod__(self, other: Operand) -> Expr:
        return _binary("%", self, other)

    def __rmod__(self, other: Operand) -> Expr:
        return _binary("%", other, self)

    def __matmul__(self, other: Operand) -> Expr:
        return _binary("@", self, other)

    def __rmatmul__(self, other: Operand) -> Expr:
        return _binary("@", other, self)

    def __pow__(self, other: Operand) -> Expr:
        return _power(self, other)

    def __rpow__(self, other: Operand) -> Expr:
        return _power(other, self)

    def __neg__(self) -> Expr:
        return Expr("-" + _wrap(self, _UNARY), _UNARY)

    def __pos__(self) -> Expr:
        return Expr("+" + _wrap(self, _UNARY), _UNARY)

    def __abs__(self) -> Expr:
        return call("abs", self)

    # -- comparisons and logic (== and != stay Python's: use eq() and ne()) ---------------------------

    def __lt__(self, other: Operand) -> Expr:
        return _compare("<", self, other)

    def __le__(self, other: Operand) -> Expr:
        return _compare("<=", self, other)

    def __gt__(self, other: Operand) -> Expr:
        return _compare(">", self, other)

    def __ge__(self, other: Operand) -> Expr:
        return _compare(">=", self, other)

    def eq(self, other: Operand) -> Expr:
        """Elementwise ``self == other`` (``==`` itself keeps Python's meaning, so Expr stays hashable)."""
        return _compare("==", self, other)

    def ne(self, other: Operand) -> Expr:
        """Elementwise ``self != other``."""
        return _compare("!=", self, other)

    def __and__(self, other: Operand) -> Expr:
        return _binary("and", self, other)

    def __rand__(self, other: Operand) -> Expr:
        return _binary("and", other, self)

    def __or__(self, other: Operand) -> Expr:
        return _binary("or", self, other)

    def __ror__(self, other: Operand) -> Expr:
        return _binary("or", other, self)

    def __invert__(self) -> Expr:
        return Expr("not " + _wrap(self, _NOT), _NOT)

    def if_else(self, condition: Operand, otherwise: Operand) -> Expr:
        """``self if condition else otherwise`` (elementwise, like where)."""
        body = _wrap(as_expr(self), _OR)
        test = _wrap(as_expr(condition), _OR)
        return Expr(f"{body} if {test} else {_wrap(as_expr(otherwise), _IF)}", _IF)

    # -- indexing ---------------------------------------------------------------------------------

    def __getitem__(self, key: object) -> Expr:
        items = key if isinstance(key, tuple) else (key,)
        return Expr(f"{_wrap(self, _ATOM)}[{', '.join(_index(item) for item in items)}]", _ATOM)

    # -- numpy-style methods ----------------------------------------------------------------------

    def sum(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Expr:
        return _reduce("sum", self, axis, keepdims)

    def mean(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Expr:
        return _reduce("mean", self, axis, keepdims)

    def prod(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Expr:
        return _reduce("prod", self, axis, keepdims)

    def max(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Expr:
        return _reduce("max", self, axis, keepdims)

    def min(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Expr:
        return _reduce("min", self, axis, keepdims)

    def var(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Expr:
        return _reduce("var", self, axis, keepdims)

    def std(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Expr:
        return _reduce("std", self, axis, keepdims)

    def reshape(self, *shape: int | Sequence[int]) -> Expr:
        target = shape[0] if len(shape) == 1 else shape
        return call("reshape", self, target)

    def dot(self, other: Operand) -> Expr:
        return call("dot", self, other)

    @property
    def T(self) -> Expr:  # numpy's name for the transpose
        return call("transpose", self)


class Var(Expr):
    """A named input: a variable or constant of the request (which one is decided by the call)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        if not _NAME.match(name) or name in _LANGUAGE_KEYWORDS or keyword.iskeyword(name):
            raise ValueError(f"{name!r} is not a valid name (letters, digits and _, not a keyword)")
        super().__init__(name, _ATOM)
        self.name = name


# What an operator or function accepts: expressions, numbers, booleans, strings (einsum
# subscripts, dtypes), None, and (nested) lists or tuples of these.
Operand = Union[Expr, int, float, bool, str, None, np.number, np.bool_, Sequence["Operand"]]  # noqa: UP007


def render(expression: Expr | str) -> str:
    """The text of an expression (a string is returned as it is)."""
    return expression if isinstance(expression, str) else str(expression)


def as_expr(value: object) -> Expr:
    """A Python value as an expression: numbers, booleans, None, strings and lists of these."""
    if isinstance(value, Expr):
        return value
    if value is None:
        return Expr("None")
    if isinstance(value, bool | np.bool_):
        return Expr("True" if value else "False")
    if isinstance(value, int | np.integer):
        number = int(value)
        return Expr(str(number), _ATOM) if number >= 0 else Expr(str(number), _UNARY)
    if isinstance(value, float | np.floating):
        return _float(float(value))
    if isinstance(value, str):
        if not _PLAIN_STRING.match(value):
            raise ValueError(
                f"string {value!r}: the language's strings cannot hold quotes, backslashes or newlines"
            )
        return Expr(f'"{value}"', _ATOM)
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return as_expr(value.item())
        raise TypeError(
            "arrays are inputs, not literals: pass them as variables or constants and refer to them by name"
        )
    if isinstance(value, list | tuple):
        return Expr("[" + ", ".join(str(as_expr(item)) for item in value) + "]", _ATOM)
    raise TypeError(f"cannot use a {type(value).__name__} in an expression")


def _float(value: float) -> Expr:
    if math.isnan(value):
        raise ValueError("NaN has no literal in the language; pass it as a constant instead")
    if math.isinf(value):
        return Expr("inf", _ATOM) if value > 0 else Expr("-inf", _UNARY)
    text = repr(value)  # shortest text that reads back as the same double
    return Expr(text, _ATOM) if value >= 0 and not text.startswith("-") else Expr(text, _UNARY)


def _wrap(expr: Expr, least: int) -> str:
    """The expression's text, parenthesised unless it binds at least as tightly as ``least``."""
    text = str(expr)
    return text if expr._level >= least else f"({text})"


def _binary(op: str, left: object, right: object) -> Expr:
    level = _BINARY_LEVEL[op]
    # Left-associative: a left operand at the same level needs no parentheses, a right one does.
    return Expr(f"{_wrap(as_expr(left), level)} {op} {_wrap(as_expr(right), level + 1)}", level)


def _compare(op: str, left: object, right: object) -> Expr:
    # Comparisons chain in the language (a < b < c); a comparison operand is always parenthesised.
    return Expr(f"{_wrap(as_expr(left), _ARITH)} {op} {_wrap(as_expr(right), _ARITH)}", _CMP)


def _power(base: object, exponent: object) -> Expr:
    # power := postfix ['**' unary]: the base must be an atom (so (-2)**x and (x**2)**3 keep their
    # parentheses); the exponent may be unary or another power (right-associative).
    return Expr(f"{_wrap(as_expr(base), _ATOM)} ** {_wrap(as_expr(exponent), _UNARY)}", _POWER)


def _index(item: object) -> str:
    if isinstance(item, slice):
        parts = ["" if part is None else str(as_expr(part)) for part in (item.start, item.stop, item.step)]
        return ":".join(parts[:2]) + (f":{parts[2]}" if item.step is not None else "")
    if item is Ellipsis:
        return "..."
    return str(as_expr(item))


def _reduce(name: str, x: Expr, axis: int | Sequence[int] | None, keepdims: bool) -> Expr:
    keywords: dict[str, object] = {}
    if axis is not None:
        keywords["axis"] = axis
    if keepdims:
        keywords["keepdims"] = True
    return call(name, x, **keywords)


def call(function: str, *args: object, **keywords: object) -> Expr:
    """A call of a built-in or request-defined function: ``call("logsumexp", x, axis=0)``."""
    if not _NAME.match(function):
        raise ValueError(f"{function!r} is not a function name")
    rendered = [str(as_expr(arg)) for arg in args]
    rendered += [f"{name}={as_expr(value)}" for name, value in keywords.items()]
    return Expr(f"{function}({', '.join(rendered)})", _ATOM)
