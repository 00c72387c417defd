"""Variables travel into and out of a traced graph packed in ONE flat vector of the computation dtype.

Converting a numpy array to a tensor costs ~50 us, so the 13 tensors of the 32-64-1 MLP with Adam
cost ~0.6 ms a call (as much as its step); concatenating them costs a few us. Loading and reading
back happen inside the graph, never variable by variable from Python (a Keras ``assign`` or
``numpy()`` costs ~0.3-0.6 ms each).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from service.engine.programs import trace

__all__ = ["assign_packed", "assigner", "pack", "packed_spec", "read_packed", "unpack"]


def packed_spec(variables: list[Any], tf_dtype: Any) -> tf.TensorSpec:
    return tf.TensorSpec([sum(_size(v.shape) for v in variables)], tf_dtype)


def _size(shape: Any) -> int:
    return int(np.prod(tuple(shape), dtype=np.int64))


def assign_packed(variables: list[Any], packed: Any) -> None:
    """Inside a traced function: write every variable from its slice (the int64 iteration count too)."""
    parts = tf.split(packed, [_size(v.shape) for v in variables]) if variables else []
    for var, part in zip(variables, parts, strict=True):
        var.assign(tf.cast(tf.reshape(part, var.shape), var.dtype))


def read_packed(variables: list[Any], tf_dtype: Any) -> Any:
    """Inside a traced function: every variable's value, flattened and concatenated."""
    if not variables:
        return tf.zeros([0], tf_dtype)
    return tf.concat([tf.reshape(tf.cast(v.value, tf_dtype), [-1]) for v in variables], 0)


def pack(arrays: list[np.ndarray], dtype: str) -> np.ndarray:
    if not arrays:
        return np.zeros([0], dtype)
    return np.concatenate([np.ravel(np.asarray(a, dtype)) for a in arrays])


def unpack(flat: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    """The packed vector as arrays shaped like ``like`` (views of one buffer; no copies)."""
    out: list[np.ndarray] = []
    start = 0
    for ref in like:
        out.append(flat[start : start + ref.size].reshape(ref.shape))
        start += ref.size
    return out


def assigner(variables: list[Any], tf_dtype: Any) -> Callable[..., Any]:
    """One traced call that writes every variable from a packed vector."""

    def load(packed: Any) -> Any:
        assign_packed(variables, packed)
        return tf.zeros([])  # an output, so the call waits for the assignments

    return trace(load, [packed_spec(variables, tf_dtype)])
