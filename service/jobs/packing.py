"""Compact pickling of jobs and results: small arrays travel as plain (dtype, shape, bytes) tuples.

Each job and result class declares which of its fields hold arrays with ``@packed(...)``; the worker
pipe (service/workers/transport.py) pickles them, so this is the hot path of every request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar

import numpy as np

__all__ = ["packed"]

# Arrays up to this size cross the worker pipe as plain (dtype, shape, bytes) tuples inside the pickle
# stream: pickling an ndarray object costs ~15 us, its bytes ~1 us. Larger ones stay ndarrays, which
# the transport sends out of band without copying.
_PACK_MAX_BYTES = 4096

_Packed = Any  # tuple[str, tuple[int, ...], bytes] for a small array, else the array itself
_T = TypeVar("_T", bound=type)

# The fields of each job and result that hold arrays (arrays, or lists and dicts nesting them, or
# None): their small arrays are packed for the pipe. Everything else pickles as it is.
_ARRAY_FIELDS: dict[type, tuple[str, ...]] = {}
_LAYOUTS: dict[type, tuple[tuple[str, bool], ...]] = {}


def packed(*array_fields: str) -> Callable[[_T], _T]:
    """Class decorator (above ``@dataclass``): pickle the class compactly, packing ``array_fields``."""

    def register(cls: _T) -> _T:
        _ARRAY_FIELDS[cls] = array_fields
        setattr(cls, "__reduce__", _reduce)  # noqa: B010  # a method of a slotted dataclass
        return cls

    return register


def _pack(array: Any) -> _Packed:
    if type(array) is np.ndarray and array.nbytes <= _PACK_MAX_BYTES:
        return (array.dtype.str, array.shape, array.tobytes())
    if isinstance(array, np.generic):  # a numpy scalar (a 0-d tensor's .numpy()): shape None
        return (array.dtype.str, None, array.tobytes())
    return array


def _unpack(packed: _Packed) -> Any:
    if type(packed) is tuple:
        dtype, shape, raw = packed
        if shape is None:
            return np.frombuffer(raw, dtype)[0]
        # A bytearray, so the array is writable, as the sender's was.
        return np.frombuffer(bytearray(raw), dtype).reshape(shape)
    return packed


def _pack_value(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [_pack_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _pack_value(v) for k, v in value.items()}
    return _pack(value)


def _unpack_value(value: Any) -> Any:
    """The inverse of ``_pack_value``: in array fields, the only tuples are packed arrays."""
    if value is None:
        return None
    if isinstance(value, list):
        return [_unpack_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _unpack_value(v) for k, v in value.items()}
    return _unpack(value)


def _layout(cls: type) -> tuple[tuple[str, bool], ...]:
    """(field name, holds arrays) for each field of a job or result class, computed once per class."""
    layout = _LAYOUTS.get(cls)
    if layout is None:
        arrays = _ARRAY_FIELDS[cls]
        layout = _LAYOUTS[cls] = tuple((f.name, f.name in arrays) for f in fields(cls))
    return layout


def _reduce(obj: Any) -> tuple[Any, ...]:
    """Compact pickling of a dataclass job or result: its field values, array fields packed."""
    layout = _layout(type(obj))
    values = tuple(_pack_value(getattr(obj, n)) if packed else getattr(obj, n) for n, packed in layout)
    return _rebuild, (type(obj), values)


def _rebuild(cls: type, values: tuple[Any, ...]) -> Any:
    return cls(
        *(_unpack_value(v) if packed else v for (_, packed), v in zip(_layout(cls), values, strict=True))
    )
