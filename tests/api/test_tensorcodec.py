"""The wire codec: round trips, non-finite values, base64, precise errors, limits before allocation."""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.errors import InvalidRequest, LimitExceeded, ShapeError
from service.tensorcodec import decode_tensor, encode_tensor


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("encoding", ["json", "base64"])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip(dtype: str, encoding: Any, data: st.DataObject) -> None:
    array = data.draw(
        hnp.arrays(
            np.dtype(dtype),
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
            elements=st.floats(width=32 if dtype == "float32" else 64, allow_nan=True, allow_infinity=True),
        )
    )
    # Nested lists cannot say (0, 3) from (0,): empty multi-axis arrays need the base64 form.
    assume(not (encoding == "json" and array.size == 0 and array.ndim > 1))
    wire = encode_tensor(array, encoding)
    back = decode_tensor(wire, dtype, field="x")
    assert back.dtype == np.dtype(dtype)
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)  # NaN == NaN for this assertion


def test_nonfinite_strings_both_ways() -> None:
    wire = encode_tensor(np.array([1.5, np.nan, np.inf, -np.inf]))
    assert wire == [1.5, "NaN", "Infinity", "-Infinity"]
    back = decode_tensor([1.5, "NaN", "Infinity", "-Infinity"], "float64", field="x")
    assert back[0] == 1.5 and math.isnan(back[1]) and back[2] == math.inf and back[3] == -math.inf
    assert encode_tensor(np.float64("nan")) == "NaN"
    assert math.isinf(decode_tensor("-Infinity", "float32", field="x"))


def test_scalars_and_ints() -> None:
    assert encode_tensor(np.asarray(3.0)) == 3.0
    assert decode_tensor(3, "float32", field="x").dtype == np.float32
    assert decode_tensor([[1, 2], [3, 4]], "float64", field="x").tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_keep_arrays_returns_contiguous_finite_arrays() -> None:
    matrix = np.arange(6.0).reshape(2, 3).T
    kept = encode_tensor(matrix, keep_arrays=True)
    assert isinstance(kept, np.ndarray) and kept.flags.c_contiguous
    assert encode_tensor(np.array([np.nan]), keep_arrays=True) == ["NaN"]


def test_base64_is_little_endian() -> None:
    wire = encode_tensor(np.array([1.0, 2.0], dtype=">f8"), "base64")
    assert wire["dtype"] == "float64"
    assert base64.b64decode(wire["b64"]) == np.array([1.0, 2.0], dtype="<f8").tobytes()
    ints = {
        "dtype": "int32",
        "shape": [2],
        "b64": base64.b64encode(np.array([3, 4], "<i4").tobytes()).decode(),
    }
    assert decode_tensor(ints, "float32", field="x").tolist() == [3.0, 4.0]


@pytest.mark.parametrize(
    ("value", "error", "field"),
    [
        ([[1.0, 2.0], [3.0]], ShapeError, "v"),
        ([[1.0, 2.0], 3.0], ShapeError, "v"),
        ([1.0, "nan"], InvalidRequest, "v"),
        (["1.0"], InvalidRequest, "v"),
        ([True, False], InvalidRequest, "v"),
        (None, InvalidRequest, "v"),
        ([{"a": 1}], InvalidRequest, "v"),
        ({"dtype": "float32", "shape": [1]}, InvalidRequest, "v"),
        ({"dtype": "float32", "shape": [1], "b64": "AAAAAAAA"}, InvalidRequest, "v.b64"),
        ({"dtype": "float32", "shape": [1], "b64": "AA!A"}, InvalidRequest, "v.b64"),
        (
            {"dtype": "float32", "shape": [1], "b64": "AAA!AA=="},
            InvalidRequest,
            "v.b64",
        ),  # right length, not base64
        ({"dtype": "float32", "shape": [-1], "b64": ""}, InvalidRequest, "v.shape"),
        ({"dtype": "float32", "shape": "1", "b64": ""}, InvalidRequest, "v.shape"),
        ({"dtype": "object", "shape": [1], "b64": "AAAAAA=="}, InvalidRequest, "v.dtype"),
    ],
)
def test_errors_name_the_field(value: Any, error: type[Exception], field: str) -> None:
    with pytest.raises(error) as caught:
        decode_tensor(value, "float32", field="v")
    assert isinstance(caught.value, InvalidRequest)
    assert caught.value.extra["field"] == field


def test_deep_nesting_is_a_shape_error() -> None:
    value: Any = 1.0
    for _ in range(100):
        value = [value]
    with pytest.raises(ShapeError):
        decode_tensor(value, "float64", field="v")


def test_element_limit_before_allocation() -> None:
    with pytest.raises(LimitExceeded) as caught:
        decode_tensor([[0.0] * 100] * 100, "float32", field="v", max_elements=9_999)
    assert caught.value.extra["limit"] == "max_input_elements"
    # A declared shape is refused before the (absent) bytes are looked at.
    huge = {"dtype": "float64", "shape": [10**6, 10**6], "b64": ""}
    with pytest.raises(LimitExceeded):
        decode_tensor(huge, "float64", field="v", max_elements=10**6)
    # A base64 length that disagrees with the shape is refused before decoding.
    with pytest.raises(InvalidRequest, match="bytes"):
        decode_tensor({"dtype": "float64", "shape": [2], "b64": "A" * 4_000_000}, "float64", field="v")


def test_float32_overflow_becomes_infinity_quietly() -> None:
    assert decode_tensor([1e300], "float32", field="v")[0] == np.inf


def test_million_elements_fast_path() -> None:
    values = np.random.default_rng(0).standard_normal(1_000_000)
    as_lists = values.reshape(1000, 1000).tolist()
    decoded = decode_tensor(as_lists, "float64", field="v", max_elements=1_000_000)
    encoded = encode_tensor(decoded, keep_arrays=True)
    # Its speed is a bench/ figure (make bench: the 1M-element rows), not an assertion here.
    assert isinstance(encoded, np.ndarray)
    np.testing.assert_array_equal(decoded.ravel(), values)


def test_a_large_list_is_converted_a_slice_at_a_time_with_the_same_result_and_the_same_refusals() -> None:
    from service import tensorcodec

    n = 3 * tensorcodec._SLICE_ELEMENTS + 7  # four slices, the last one short
    flat = [float(i) * 0.5 for i in range(n)]
    flat[5] = 3  # an int in the first slice, floats after: one float64 array, as np.array gives
    assert np.array_equal(decode_tensor(flat, "float64", field="x"), np.array(flat))
    rows = [[float(i), 1.0, 2.0] for i in range(n // 3)]
    assert decode_tensor(rows, "float32", field="x").shape == (n // 3, 3)
    # Ragged only in the last slice, a boolean only in the last slice: found all the same.
    with pytest.raises(ShapeError):
        decode_tensor([*rows[:-1], [1.0, 2.0]], "float64", field="x")
    with pytest.raises(InvalidRequest, match="boolean"):
        decode_tensor([*flat[:-1], True], "float64", field="x")
    # A non-finite string late in the list takes the slow path and decodes.
    assert np.isnan(decode_tensor([*flat[:-1], "NaN"], "float64", field="x")[-1])
