"""Request building for the gradient endpoint, and ``Call``: one API call as data, before any I/O.

A ``Call`` says what to send (method, path, JSON body) and how to read the answer (``parse``);
``Client`` and ``AsyncClient`` send the same ``Call`` objects and differ only in how they wait.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
from numpy.typing import ArrayLike

from service.client._builder import Expr, render
from service.client._results import Derivatives
from service.client._wire import TensorCodec

__all__ = ["Call", "TrainStream", "function_spec", "gradient_call", "merge_variables"]

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call, independent of sync or async: what to send and how to read the answer."""

    method: str
    path: str
    body: dict[str, Any] | None
    parse: Callable[[Any], T]
    accept: tuple[int, ...] = (200,)  # statuses that are answers, not errors (/readyz's 503)


@dataclass(frozen=True)
class TrainStream:
    """A streamed train-step: the call whose answer is NDJSON lines, and the dtype they are read in."""

    call: Call[Any]
    dtype: str


def merge_variables(
    variables: Mapping[str, ArrayLike] | None, keywords: Mapping[str, ArrayLike]
) -> dict[str, ArrayLike]:
    """``variables={...}`` and ``x=...`` keyword arguments together (a name given twice is an error)."""
    merged: dict[str, ArrayLike] = dict(variables or {})
    for name, value in keywords.items():
        if name in merged:
            raise TypeError(f"variable {name!r} is given both in variables= and as a keyword argument")
        merged[name] = value
    return merged


def _names(values: Iterable[str] | str | None) -> list[str] | None:
    if values is None:
        return None
    return [values] if isinstance(values, str) else list(values)


def _expected_output(derivatives: Sequence[str], sizes: Mapping[str, int], wrt: list[str] | None) -> int:
    """A lower bound of the response's elements, known before sending (to ask for base64 answers)."""
    names = wrt if wrt is not None else list(sizes)
    n = sum(sizes.get(name, 0) for name in names)
    total = n if any(d in derivatives for d in ("gradient", "jacobian", "hvp", "vjp")) else 0
    if "hessian" in derivatives:
        total += n * n
    return total


def gradient_call(
    expression: Expr | str,
    variables: Mapping[str, ArrayLike],
    *,
    codec: TensorCodec,
    derivatives: Sequence[str],
    parse: Callable[[Derivatives], T],
    constants: Mapping[str, ArrayLike] | None = None,
    functions: Mapping[str, Any] | None = None,
    wrt: Iterable[str] | str | None = None,
    tangents: Mapping[str, ArrayLike] | None = None,
    cotangent: ArrayLike | None = None,
    order: int | None = None,
    batch: bool = False,
    dtype: str | None = None,
    timeout_s: float | None = None,
) -> Call[T]:
    """The ``POST /v1/gradient`` call for one expression and its inputs."""
    dtype_for_inputs = dtype or "float32"  # the server's default
    encoded = codec.encode_map(variables, dtype_for_inputs, "variables")
    body: dict[str, Any] = {"expression": render(expression), "variables": encoded}
    if constants:
        body["constants"] = codec.encode_map(constants, dtype_for_inputs, "constants")
    if functions:
        body["functions"] = {name: function_spec(name, spec) for name, spec in functions.items()}
    body["derivatives"] = list(derivatives)
    wrt_list = _names(wrt)
    if wrt_list is not None:
        body["wrt"] = wrt_list
    if tangents is not None:
        body["tangents"] = codec.encode_map(tangents, dtype_for_inputs, "tangents")
    if cotangent is not None:
        body["cotangent"] = codec.encode(cotangent, dtype_for_inputs, "cotangent")
    if order is not None:
        body["order"] = order
    if batch:
        body["batch"] = True
    if dtype is not None:
        body["dtype"] = dtype
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    sizes = {name: int(np.size(value)) for name, value in variables.items()}
    expected = _expected_output(derivatives, sizes, wrt_list)
    if order is not None:
        target = wrt_list[0] if wrt_list else (next(iter(sizes)) if len(sizes) == 1 else None)
        n = sizes.get(target, 1) if target is not None else 1
        expected += sum(n**k for k in range(1, order + 1))
    if codec.wants_base64(expected):
        body["encoding"] = "base64"
    return Call("POST", "/v1/gradient", body, lambda payload: parse(Derivatives.from_json(payload)))


def function_spec(name: str, spec: Any) -> dict[str, Any]:
    """A user function: a dict as the API takes it, with Expr bodies and gradients rendered."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"functions[{name!r}] must be a dict with params, body and optionally gradient")
    out = dict(spec)
    if isinstance(out.get("body"), Expr):
        out["body"] = render(out["body"])
    if isinstance(out.get("gradient"), Mapping):
        out["gradient"] = {param: render(g) for param, g in out["gradient"].items()}
    if "params" in out:
        out["params"] = [p.name if hasattr(p, "name") else str(p) for p in out["params"]]
    return out
