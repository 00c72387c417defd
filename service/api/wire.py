"""The one rendering of a response body as bytes: strict RFC 8259 JSON, whatever the content holds.

Every number follows one rule, wherever it appears (tensors, scalars such as ``loss``, histories,
NDJSON lines, UM-Bridge answers, problem details):

- a non-finite float is the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` (orjson alone
  would write ``null``);
- an integer orjson cannot write (outside [-2**63, 2**64 - 1]) is its decimal string.

``dumps`` is orjson with numpy buffers in the common case: when its output holds no ``null`` (how
orjson writes a non-finite float), that is the answer. Otherwise the content is walked only where
a cheap check (``sum`` over a list, ``isfinite`` over an array) says a non-finite number may hide,
and fully only when orjson refuses it. ``dumps_safe`` cannot fail: anything it still cannot write
becomes a string.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

from service.tensorcodec import encode_tensor

__all__ = ["dumps", "dumps_safe", "strict"]

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
# Deeper than any response; a self-referencing or absurdly nested detail becomes a string.
_MAX_DEPTH = 64


def _name(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _finite_list(items: list[Any]) -> bool:
    """True when ``items`` is a flat list of finite numbers (checked by ``sum``, at C speed)."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # numpy scalars: inf - inf is the answer here
            total = sum(items)
    except (TypeError, OverflowError, ValueError):
        return False  # strings, lists, dicts, None... or huge integers mixed with floats
    if isinstance(total, bool | int):
        return True  # only integers (and booleans): orjson writes them, or raises on huge ones
    if isinstance(total, float | np.floating):
        return math.isfinite(total)  # any NaN/inf makes the sum non-finite; overflow is only slower
    return False


def strict(value: Any, *, exact: bool = False, depth: int = 0) -> Any:
    """``value`` with non-finite floats as their names (and, when ``exact``, huge integers and
    anything orjson cannot write as strings). Containers are copied only where something changed."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float | np.floating):
        return value if math.isfinite(value) else _name(float(value))
    if isinstance(value, int | np.integer):
        if exact and not _INT_MIN <= int(value) <= _INT_MAX:
            return str(int(value))
        return value
    if depth >= _MAX_DEPTH:
        return str(value) if exact else value
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return encode_tensor(value, "json")
        if exact and value.dtype.kind not in "biuf":
            return [strict(item, exact=True, depth=depth + 1) for item in value.tolist()]
        return value
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        changed = False
        for key, item in value.items():
            new_key = key if isinstance(key, str) or not exact else str(key)
            new = strict(item, exact=exact, depth=depth + 1)
            changed = changed or new is not item or new_key is not key
            out[new_key] = new
        return out if changed else value
    if isinstance(value, list | tuple):
        if not exact and _finite_list(value if isinstance(value, list) else list(value)):
            return value
        items = [strict(item, exact=exact, depth=depth + 1) for item in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return items
    if exact:
        try:
            orjson.dumps(value, option=_OPTIONS)
        except (TypeError, orjson.JSONEncodeError):
            return str(value)
    return value


def dumps(content: Any) -> bytes:
    """``content`` as strict JSON, by the one rule for numbers; raises only for what no rule covers
    (an object orjson cannot write at all)."""
    try:
        plain = orjson.dumps(content, option=_OPTIONS)
    except (TypeError, orjson.JSONEncodeError):
        plain = None
    # orjson writes every non-finite float as null: output without a null had none, so the walk
    # below would change nothing. Most answers take this way (one C call, no walk in Python).
    if plain is not None and b"null" not in plain:
        return plain
    try:
        return orjson.dumps(strict(content), option=_OPTIONS)
    except (TypeError, orjson.JSONEncodeError):
        return orjson.dumps(strict(content, exact=True), option=_OPTIONS)


def dumps_safe(content: Any) -> bytes:
    """As ``dumps``, but it cannot fail: what orjson cannot write becomes its ``str``."""
    try:
        return orjson.dumps(strict(content), option=_OPTIONS, default=str)
    except Exception:  # huge integers, non-str keys with odd types, recursion...
        pass
    try:
        return orjson.dumps(strict(content, exact=True), option=_OPTIONS, default=str)
    except Exception:
        return orjson.dumps({"detail": "the response could not be rendered"})
