"""Tensors on the client's side of the wire: numpy arrays to wire tensors, request bodies as bytes,
and response tensors back to numpy arrays.

The wire format itself is defined once, in ``service.tensorcodec``: a base module (numpy only, no
TensorFlow) that the server and this client both import. This module only adds what a client
chooses (when to send base64) and turns the codec's errors, which are the server's
``service.errors`` types, into the client's ``DecodingError``: here and nowhere else.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from service.client._exceptions import DecodingError
from service.tensorcodec import FLOAT_DTYPES, WIRE_DTYPES, decode_tensor, encode_tensor

__all__ = [
    "DEFAULT_BASE64_THRESHOLD",
    "EncodingChoice",
    "TensorCodec",
    "decode_map",
    "decode_tensor_field",
    "dumps_body",
]

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
        return decode_tensor(value, dtype if dtype in FLOAT_DTYPES else "float64", field=where)
    except Exception as error:  # the codec raises service.errors types (or numpy's); users see ours
        raise DecodingError(f"the response's {where} is not a tensor: {error}") from None


def decode_map(value: Any, dtype: str, where: str) -> dict[str, np.ndarray]:
    if not isinstance(value, Mapping):
        raise DecodingError(f"the response's {where} is not an object")
    return {name: decode_tensor_field(item, dtype, f"{where}.{name}") for name, item in value.items()}
