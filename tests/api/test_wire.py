"""wire.dumps: the orjson-only way for answers without a null gives the same bytes as the walk."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api import wire

_FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)
_ARRAYS = st.lists(_FLOATS, min_size=0, max_size=6).map(lambda xs: np.asarray(xs, dtype=np.float64))
_LEAVES = st.one_of(
    _FLOATS,
    st.integers(min_value=-(2**62), max_value=2**62),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
    _ARRAYS,
    _FLOATS.map(np.float64),
)
_CONTENT = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


def _walked(content: Any) -> bytes:
    """What dumps wrote before it tried orjson alone: always the walk (the reference)."""
    return orjson.dumps(wire.strict(content), option=orjson.OPT_SERIALIZE_NUMPY)


@settings(max_examples=300, deadline=None)
@given(_CONTENT)
def test_dumps_writes_what_the_walk_writes(content: Any) -> None:
    assert wire.dumps(content) == _walked(content)


def test_a_gradient_answer_takes_the_orjson_only_way_and_non_finite_numbers_keep_their_names() -> None:
    finite = {"value": 1.5, "gradient": {"x": np.array([1.0, -2.0])}, "meta": {"cache": "hit"}}
    assert wire.dumps(finite) == orjson.dumps(finite, option=orjson.OPT_SERIALIZE_NUMPY)
    odd = {"value": math.inf, "gradient": {"x": np.array([np.nan, 1.0])}, "meta": {"note": None}}
    assert orjson.loads(wire.dumps(odd)) == {
        "value": "Infinity",
        "gradient": {"x": ["NaN", 1.0]},
        "meta": {"note": None},
    }
    # A string that merely contains "null" takes the walk, and changes nothing.
    assert orjson.loads(wire.dumps({"expression": "nullspace(x)", "v": -math.inf})) == {
        "expression": "nullspace(x)",
        "v": "-Infinity",
    }
