"""Tensors on the wire: JSON numbers / nested lists (non-finite as strings) or base64 little-endian bytes.

numpy only, so the server and the httpx client share it. Two wire forms, both strict RFC 8259 JSON:

- a number or row-major nested lists; NaN and the infinities travel as the strings ``"NaN"``,
  ``"Infinity"`` and ``"-Infinity"`` (the protobuf JSON mapping);
- ``{"dtype": "float32", "shape": [2, 3], "b64": "<little-endian bytes>"}``.

Nested lists cannot tell shape (0, 3) from (0,): empty arrays of several axes need the base64 form.
Decoding checks the element count against the limit before allocating wherever the count is known
up front (a base64 length, a declared shape, the outer lengths of nested lists).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np

from service.errors import InvalidRequest, LimitExceeded, ShapeError

try:  # SIMD base64 (~5 GB/s against binascii's ~0.3-0.5): the codec's whole cost for large tensors
    import pybase64 as _fast_b64
except ImportError:  # pragma: no cover - the server installs it; a client-only install may not
    _fast_b64 = None  # type: ignore[assignment]

__all__ = [
    "FLOAT_DTYPES",
    "NONFINITE",
    "WIRE_DTYPES",
    "Encoding",
    "decode_tensor",
    "encode_tensor",
]

Encoding = Literal["json", "base64"]

# The dtypes a computation runs in.
FLOAT_DTYPES = ("float32", "float64")
# The dtypes a base64 tensor may carry; values are cast to the request dtype.
WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "bool": np.dtype("bool"),
}
NONFINITE: dict[str, float] = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_B64_KEYS = frozenset({"dtype", "shape", "b64"})
# More dimensions than any real tensor has; bounds the shape walk over hostile nested lists.
_MAX_NDIM = 32
# The largest product of non-zero dimensions a shape may claim (an empty tensor's other axes).
_MAX_SPAN = 2**40


def _shown_shape(shape: list[int]) -> str:
    text = str(shape)
    return text if len(text) <= 80 else text[:77] + "..."


def _too_many(field: str, count: int, limit: int) -> LimitExceeded:
    return LimitExceeded(
        f"{field} has {count} elements; at most {limit} are allowed per input tensor",
        limit="max_input_elements",
        allowed=limit,
        field=field,
        requested=count,
    )


def decode_tensor(value: Any, dtype: str, *, field: str, max_elements: int | None = None) -> np.ndarray:
    """A wire tensor as a numpy array of ``dtype`` ("float32" or "float64").

    Raises ShapeError for ragged lists, InvalidRequest (naming ``field``) for anything else that is
    not a tensor, and LimitExceeded when it holds more than ``max_elements`` elements.
    """
    if dtype not in FLOAT_DTYPES:
        raise InvalidRequest(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, not {dtype!r}", field="dtype")
    target = np.dtype(dtype)
    if isinstance(value, Mapping):
        return _decode_b64(value, target, field, max_elements)
    if isinstance(value, bool):
        raise InvalidRequest(
            f"{field} must be a number or nested lists of numbers, not a boolean", field=field
        )
    if isinstance(value, int | float):
        return np.asarray(value, dtype=target)
    if isinstance(value, str):
        if value in NONFINITE:
            return np.asarray(NONFINITE[value], dtype=target)
        raise _bad_string(value, field)
    if isinstance(value, list):
        return _decode_nested(value, target, field, max_elements)
    raise InvalidRequest(
        f"{field} must be a number, nested lists of numbers or a {{dtype, shape, b64}} object", field=field
    )


def _bad_string(value: str, field: str) -> InvalidRequest:
    shown = value if len(value) <= 20 else value[:20] + "..."
    return InvalidRequest(
        f"{field} contains the string {shown!r}; the only strings allowed in a tensor are "
        '"NaN", "Infinity" and "-Infinity"',
        field=field,
    )


def _leading_shape(value: list[Any], field: str) -> tuple[int, ...]:
    """The shape nested lists claim along their first elements (cheap; raggedness is found later)."""
    shape: list[int] = []
    item: Any = value
    while isinstance(item, list):
        shape.append(len(item))
        if len(shape) > _MAX_NDIM:
            raise ShapeError(f"{field} is nested more than {_MAX_NDIM} levels deep", field=field)
        if not item:
            break
        item = item[0]
    return tuple(shape)


def _decode_nested(
    value: list[Any], target: np.dtype[Any], field: str, max_elements: int | None
) -> np.ndarray:
    claimed = math.prod(_leading_shape(value, field))
    if max_elements is not None and claimed > max_elements:
        raise _too_many(field, claimed, max_elements)
    try:
        # Fast path: plain numbers. numpy infers the dtype, so strings and booleans show up in it.
        inferred = _array_in_slices(value, claimed)
    except (ValueError, TypeError):
        inferred = None
    if (
        inferred is not None
        and inferred.dtype.kind in "iuf"
        and inferred.dtype != object
        and not _holds_bool(value, inferred.ndim)
    ):
        if max_elements is not None and inferred.size > max_elements:
            raise _too_many(field, inferred.size, max_elements)
        with np.errstate(over="ignore"):
            return inferred.astype(target, copy=False)
    # Slow path: non-finite strings, booleans, junk or ragged lists; walk the lists once.
    cleaned = _clean(value, field, 0)
    try:
        array = np.array(cleaned, dtype=target)
    except (ValueError, TypeError, OverflowError) as error:
        raise ShapeError(
            f"{field} is not a regular tensor: nested lists must have equal lengths at each level ({error})",
            field=field,
        ) from None
    if max_elements is not None and array.size > max_elements:
        raise _too_many(field, array.size, max_elements)
    return array


# Elements numpy converts in one call (~2.5 ms of float lists): a call holds the GIL throughout, so a
# large tensor decoded in a thread of the API process is converted a slice at a time, and the event
# loop gets the interpreter between slices instead of waiting ~40 ms for a million elements.
_SLICE_ELEMENTS = 65_536


def _slices(value: list[Any], claimed: int) -> Iterator[list[Any]]:
    """``value`` cut along its first axis into pieces of about ``_SLICE_ELEMENTS`` elements."""
    per_item = max(1, claimed // max(1, len(value)))
    step = max(1, _SLICE_ELEMENTS // per_item)
    for start in range(0, len(value), step):
        yield value[start : start + step]


def _array_in_slices(value: list[Any], claimed: int) -> np.ndarray:
    """``np.array(value)``, a slice at a time when large (ValueError when ragged across slices too)."""
    if claimed <= _SLICE_ELEMENTS or len(value) < 2:
        return np.array(value)
    return np.concatenate([np.array(part) for part in _slices(value, claimed)])


def _holds_bool(value: list[Any], ndim: int) -> bool:
    """Whether regular nested lists of ``ndim`` levels hold a boolean (numpy reads True as 1).

    One pass over the leaves at C speed (``map(type, ...)``), a slice at a time: booleans are not
    numbers here.
    """
    claimed = math.prod(_leading_shape(value, "")) if value else 0
    for part in _slices(value, claimed) if value else ():
        leaves: Any = part
        for _ in range(ndim - 1):
            leaves = itertools.chain.from_iterable(leaves)
        if bool in set(map(type, leaves)):
            return True
    return False


def _clean(value: Any, field: str, depth: int) -> Any:
    if isinstance(value, list):
        if depth >= _MAX_NDIM:
            raise ShapeError(f"{field} is nested more than {_MAX_NDIM} levels deep", field=field)
        return [_clean(item, field, depth + 1) for item in value]
    if isinstance(value, bool):
        raise InvalidRequest(f"{field} contains a boolean; tensors hold numbers only", field=field)
    if isinstance(value, int | float):
        if isinstance(value, int) and abs(value) > 2**1023:
            raise InvalidRequest(f"{field} contains an integer too large for float64", field=field)
        return value
    if isinstance(value, str):
        if value in NONFINITE:
            return NONFINITE[value]
        raise _bad_string(value, field)
    raise InvalidRequest(
        f"{field} contains a {type(value).__name__}; tensors hold numbers or nested lists of numbers",
        field=field,
    )


def _decode_b64(
    value: Mapping[str, Any], target: np.dtype[Any], field: str, max_elements: int | None
) -> np.ndarray:
    keys = set(value)
    if keys != _B64_KEYS:
        missing = sorted(_B64_KEYS - keys)
        extra = sorted(keys - _B64_KEYS)
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(extra)}"] if extra else []
        )
        raise InvalidRequest(
            f"{field}: a base64 tensor is {{dtype, shape, b64}} ({'; '.join(parts)})", field=field
        )
    wire_dtype = value["dtype"]
    if not isinstance(wire_dtype, str) or wire_dtype not in WIRE_DTYPES:
        raise InvalidRequest(
            f"{field}.dtype must be one of {', '.join(WIRE_DTYPES)}",
            field=f"{field}.dtype",
            allowed=list(WIRE_DTYPES),
        )
    wire = WIRE_DTYPES[wire_dtype]
    shape = value["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise InvalidRequest(
            f"{field}.shape must be a list of at most {_MAX_NDIM} non-negative integers",
            field=f"{field}.shape",
        )
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise _too_many(field, count, max_elements)
    # A zero-element shape may still claim dimensions no array can have ([0, 2**62, 2**62]):
    # bound the product of the other dimensions too, before numpy's reshape sees them.
    span = math.prod(d for d in shape if d)
    if span > _MAX_SPAN:
        raise LimitExceeded(
            f"{field}.shape {_shown_shape(shape)} has dimensions too large for any tensor "
            f"(the product of its non-zero dimensions may be at most 2**40)",
            limit="max_dimension_product",
            allowed=_MAX_SPAN,
            field=f"{field}.shape",
        )
    data = value["b64"]
    if not isinstance(data, str):
        raise InvalidRequest(f"{field}.b64 must be a base64 string", field=f"{field}.b64")
    # The decoded length is known from the text length: refuse before decoding anything.
    expected = count * wire.itemsize
    decoded_len = len(data) * 3 // 4 - data[-2:].count("=")
    if decoded_len != expected:
        raise InvalidRequest(
            f"{field}.b64 holds {decoded_len} bytes but shape {shape} of {wire_dtype} needs {expected}",
            field=f"{field}.b64",
        )
    try:
        raw = _b64decode(data)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field}.b64 is not valid base64", field=f"{field}.b64") from None
    if len(raw) != expected:
        raise InvalidRequest(
            f"{field}.b64 holds {len(raw)} bytes but shape {shape} of {wire_dtype} needs {expected}",
            field=f"{field}.b64",
        )
    try:
        array = np.frombuffer(raw, dtype=wire).reshape(shape)
    except ValueError as error:  # unreachable after the checks above; never a 500
        raise InvalidRequest(
            f"{field}.shape is not a valid shape ({error})", field=f"{field}.shape"
        ) from None
    if array.dtype == target:
        # writable as it is when decoded into a bytearray (no copy of a large tensor); else a copy
        return array if array.flags.writeable else array.copy()
    with np.errstate(over="ignore"):
        return array.astype(target)  # a native-endian, writable copy


def _b64decode(data: str) -> bytes | bytearray:
    """Strict base64: only the alphabet and correct padding (b64decode's validate=True), else an error."""
    if _fast_b64 is not None and data.isascii():
        # into a bytearray: an array on it is writable without a copy
        return _fast_b64.b64decode_as_bytearray(data, validate=True)
    return binascii.a2b_base64(data, strict_mode=True)  # a non-ASCII text fails here, as it should


def _b64encode(raw: bytes | memoryview) -> str:
    if _fast_b64 is not None:
        return _fast_b64.b64encode_as_string(raw)
    return base64.b64encode(raw).decode("ascii")


def encode_tensor(
    array: np.ndarray | float, encoding: Encoding = "json", *, keep_arrays: bool = False
) -> Any:
    """A numpy array in wire form.

    ``"json"`` gives a number or nested lists (non-finite values as strings); with ``keep_arrays``
    an all-finite array of at least one dimension is returned as a C-contiguous native-endian array
    instead, for serializers that write numpy buffers directly (orjson's OPT_SERIALIZE_NUMPY).
    ``"base64"`` gives ``{"dtype", "shape", "b64"}`` in little-endian byte order.
    """
    arr = np.asarray(array)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"cannot encode an array of dtype {arr.dtype}")
    if encoding == "base64":
        name = "bool" if arr.dtype.kind == "b" else arr.dtype.name
        if name not in WIRE_DTYPES:
            arr, name = arr.astype(np.float64), "float64"
        little = arr.astype(WIRE_DTYPES[name], copy=False)
        return {
            "dtype": name,
            "shape": list(arr.shape),
            "b64": _b64encode(np.ascontiguousarray(little).reshape(-1).view(np.uint8).data),
        }
    if encoding != "json":
        raise ValueError(f"unknown encoding {encoding!r}")
    if arr.dtype.kind != "f":
        return arr.tolist()
    finite = np.isfinite(arr)
    if arr.ndim == 0:
        value = float(arr)
        return value if finite else _nonfinite_name(value)
    if finite.all():
        if keep_arrays:
            return np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("="), copy=False))
        return arr.tolist()
    out = arr.astype(object)
    out[np.isnan(arr)] = "NaN"
    out[np.isposinf(arr)] = "Infinity"
    out[np.isneginf(arr)] = "-Infinity"
    return out.tolist()


def _nonfinite_name(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"
