"""Request bodies and response parsing for the client: numpy arrays to wire tensors and back.

Shared by ``Client`` and ``AsyncClient`` so both send and read exactly the same JSON. Tensors use
``service.tensorcodec`` (numpy only; the one definition of the wire format, shared with the server).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import numpy as np
from numpy.typing import ArrayLike

from service.client._builder import Expr, render
from service.client._exceptions import DecodingError
from service.tensorcodec import WIRE_DTYPES, decode_tensor, encode_tensor

__all__ = [
    "DEFAULT_BASE64_THRESHOLD",
    "Call",
    "Derivatives",
    "EncodingChoice",
    "Meta",
    "TensorCodec",
    "decode_map",
    "decode_tensor_field",
    "dumps_body",
    "gradient_call",
]

T = TypeVar("T")
EncodingChoice = Literal["auto", "json", "base64"]
# Above this many elements a tensor travels as base64: JSON numbers cost ~20 bytes each and a
# parse per element, base64 5.3 (float32); below it readable JSON costs under ~5 KB more.
DEFAULT_BASE64_THRESHOLD = 256


# base64 texts longer than this are spliced into the body after json.dumps, which would otherwise scan
# every character for escapes (~20 ms for a 640k-element float64 tensor; the splice is a copy).
_SPLICE_CHARS = 64 * 1024
_BASE64_KEYS = frozenset({"dtype", "shape", "b64"})


def dumps_body(body: Any) -> bytes:
    """``body`` as strict JSON bytes (json.dumps, allow_nan=False), with large base64 texts spliced in.

    A text is spliced only if json.dumps would write it unchanged (printable ASCII without quote or
    backslash, as base64 is), so the bytes are exactly what json.dumps alone would have written.
    """
    texts: list[bytes] = []
    # A fresh token per body: no string of the body (an expression, a name) can hold it by chance.
    token = secrets.token_hex(8)

    def hold(value: Any) -> Any:
        if isinstance(value, dict):
            raw = _spliceable(value.get("b64")) if value.keys() == _BASE64_KEYS else None
            if raw is not None:
                texts.append(raw)
                return {**value, "b64": f"\x00{token}{len(texts) - 1}"}
            return {key: hold(item) for key, item in value.items()}
        if isinstance(value, list):
            return [hold(item) for item in value]
        return value

    encoded = json.dumps(hold(body), allow_nan=False, separators=(",", ":"))
    if not texts:
        return encoded.encode()
    # json.dumps writes each placeholder as "\u0000<token><i>": split on it, put the texts back
    parts = encoded.split(f'"\\u0000{token}')
    out = [parts[0].encode()]
    for part in parts[1:]:
        index, _, rest = part.partition('"')
        out += [b'"', texts[int(index)], b'"', rest.encode()]
    return b"".join(out)


def _spliceable(text: Any) -> bytes | None:
    """A long text as ASCII bytes if json.dumps would write it as it is (no escapes), else None."""
    if not isinstance(text, str) or len(text) <= _SPLICE_CHARS or not text.isascii():
        return None
    raw = text.encode("ascii")
    # numpy's min is one pass at memory speed; str.isprintable is ~15 times slower
    if b'"' in raw or b"\\" in raw or int(np.frombuffer(raw, np.uint8).min()) < 0x20:
        return None
    return raw


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call, independent of sync or async: what to send and how to read the answer."""

    method: str
    path: str
    body: dict[str, Any] | None
    parse: Callable[[Any], T]
    accept: tuple[int, ...] = (200,)  # statuses that are answers, not errors (/readyz's 503)


@dataclass(frozen=True)
class TensorCodec:
    """How this client writes tensors: base64 above ``threshold`` elements, or always one form."""

    threshold: int = DEFAULT_BASE64_THRESHOLD
    encoding: EncodingChoice = "auto"

    def encode(self, value: ArrayLike, dtype: str | None, where: str = "tensor") -> Any:
        """A wire tensor; floats are cast to the request ``dtype`` first (the server casts anyway)."""
        try:
            array = np.asarray(value)
        except ValueError as error:  # ragged nested lists
            raise ValueError(f"{where} is not a regular tensor: {error}") from None
        if array.dtype.kind == "O" or array.dtype.kind not in "biuf":
            raise TypeError(f"{where} must hold numbers, not {array.dtype}")
        if array.dtype.kind == "f" and dtype is not None and array.dtype != np.dtype(dtype):
            array = array.astype(dtype)
        if self.wants_base64(array.size) and _base64_able(array):
            return encode_tensor(array, "base64")
        return encode_tensor(array, "json")

    def wants_base64(self, elements: int) -> bool:
        if self.encoding == "auto":
            return elements > self.threshold
        return self.encoding == "base64"

    def encode_map(self, values: Mapping[str, ArrayLike], dtype: str | None, where: str) -> dict[str, Any]:
        return {name: self.encode(value, dtype, f"{where}.{name}") for name, value in values.items()}


def _base64_able(array: np.ndarray) -> bool:
    name = "bool" if array.dtype.kind == "b" else array.dtype.name
    return name in WIRE_DTYPES


def decode_tensor_field(value: Any, dtype: str, where: str) -> np.ndarray:
    """A tensor of the response as a numpy array (non-finite strings and base64 decoded)."""
    try:
        return decode_tensor(value, dtype if dtype in ("float32", "float64") else "float64", field=where)
    except Exception as error:  # the shared codec raises the server's error types; ours is DecodingError
        raise DecodingError(f"the response's {where} is not a tensor: {error}") from None


def decode_map(value: Any, dtype: str, where: str) -> dict[str, np.ndarray]:
    if not isinstance(value, Mapping):
        raise DecodingError(f"the response's {where} is not an object")
    return {name: decode_tensor_field(item, dtype, f"{where}.{name}") for name, item in value.items()}


def _mapping(payload: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise DecodingError(f"the {what} response is not a JSON object")
    return payload


@dataclass(frozen=True)
class Meta:
    """How the server computed the answer."""

    cache: str  # "hit" when the compiled tape program was reused
    compute_ms: float  # time in the worker
    total_ms: float  # dispatch to result
    executor: str = "tensorflow"  # "numpy" when the server ran the program's checked numpy plan


@dataclass(frozen=True)
class Derivatives:
    """Everything ``POST /v1/gradient`` returned, as numpy arrays; what was not requested is None."""

    value: np.ndarray
    dtype: str
    meta: Meta
    gradient: dict[str, np.ndarray] | None = None
    jacobian: dict[str, np.ndarray] | None = None
    hessian: dict[str, dict[str, np.ndarray]] | None = None
    hvp: dict[str, np.ndarray] | None = None
    jvp: np.ndarray | None = None
    vjp: dict[str, np.ndarray] | None = None
    derivatives: list[np.ndarray] | None = field(default=None)  # with order k: d1..dk

    @classmethod
    def from_json(cls, payload: Any) -> Derivatives:
        body = _mapping(payload, "gradient")
        dtype = body.get("dtype")
        if dtype not in ("float32", "float64") or "value" not in body:
            raise DecodingError("the gradient response has no value or dtype")
        meta = body.get("meta") or {}
        try:
            parsed_meta = Meta(
                str(meta["cache"]),
                float(meta["compute_ms"]),
                float(meta["total_ms"]),
                str(meta.get("executor", "tensorflow")),
            )
        except (KeyError, TypeError, ValueError):
            raise DecodingError("the gradient response's meta is malformed") from None
        hessian = None
        if "hessian" in body:
            rows = _mapping(body["hessian"], "hessian")
            hessian = {a: decode_map(row, dtype, f"hessian.{a}") for a, row in rows.items()}
        higher = None
        if "derivative" in body:
            block = _mapping(body["derivative"], "derivative")
            listed = block.get("derivatives")
            if not isinstance(listed, list):
                raise DecodingError("the response's derivative.derivatives is not a list")
            higher = [
                decode_tensor_field(t, dtype, f"derivative.derivatives[{i}]") for i, t in enumerate(listed)
            ]

        def opt_map(name: str) -> dict[str, np.ndarray] | None:
            return decode_map(body[name], dtype, name) if name in body else None

        return cls(
            value=decode_tensor_field(body["value"], dtype, "value"),
            dtype=dtype,
            meta=parsed_meta,
            gradient=opt_map("gradient"),
            jacobian=opt_map("jacobian"),
            hessian=hessian,
            hvp=opt_map("hvp"),
            jvp=decode_tensor_field(body["jvp"], dtype, "jvp") if "jvp" in body else None,
            vjp=opt_map("vjp"),
            derivatives=higher,
        )


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
