"""The base64 codec's two implementations (pybase64's SIMD one, binascii's fallback) agree exactly.

Same bytes out for every dtype and shape, the same arrays back, and the same refusals: a faster
decoder must not accept a text the strict one refuses.
"""

from __future__ import annotations

import numpy as np
import pytest

from service import tensorcodec
from service.errors import InvalidRequest
from service.tensorcodec import decode_tensor, encode_tensor

pytest.importorskip("pybase64")

ARRAYS = [
    np.random.default_rng(0).standard_normal((3, 4)),
    np.random.default_rng(1).standard_normal(200_001).astype(np.float32),  # past any inline size
    np.arange(6, dtype=np.int32).reshape(2, 3),
    np.array([True, False, True]),
    np.zeros((0, 3)),
    np.float64(2.5),
    np.random.default_rng(2).standard_normal((5, 3)).T,  # not contiguous
    np.arange(4, dtype=">f8"),  # big-endian: the wire is little-endian
]


@pytest.fixture(params=["pybase64", "binascii"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "binascii":
        monkeypatch.setattr(tensorcodec, "_fast_b64", None)
    return str(request.param)


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{list(np.shape(a))}")
def test_both_codecs_write_the_same_text(array: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = encode_tensor(array, "base64")
    monkeypatch.setattr(tensorcodec, "_fast_b64", None)
    assert encode_tensor(array, "base64") == fast


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{list(np.shape(a))}")
def test_round_trip_is_exact_and_writable(array: np.ndarray, codec: str) -> None:
    decoded = decode_tensor(encode_tensor(array, "base64"), "float64", field="x")
    np.testing.assert_array_equal(decoded, np.asarray(array, np.float64))
    assert decoded.dtype == np.float64 and decoded.flags.writeable
    decoded[...] = 0  # the engine may write into inputs; no read-only buffer may leak


@pytest.mark.parametrize(
    "text",
    ["AAAA AAAAAA=", "AAAA\nAAAAAA=", "AAAA=AAAAAA=", "AAAAAAAAAA=A", "AAAAAAAAAé=", "AAAAAAA-AAA="],
    ids=["space", "newline", "inner-pad", "pad-not-last", "non-ascii", "url-alphabet"],
)
def test_both_codecs_refuse_the_same_texts(text: str, codec: str) -> None:
    # each claims the 8 bytes one float64 needs (so the length check passes): the decoder must refuse
    assert decode_tensor({"dtype": "float64", "shape": [1], "b64": "AAAAAAAAAAA="}, "float64", field="x") == 0
    with pytest.raises(InvalidRequest, match="not valid base64|holds"):
        decode_tensor({"dtype": "float64", "shape": [1], "b64": text}, "float64", field="x")
