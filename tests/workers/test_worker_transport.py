"""The pipe protocol: numpy arrays cross as raw buffers and come back equal and writable."""

from __future__ import annotations

import multiprocessing
import pickle
import threading
from typing import Any

import numpy as np

from service.errors import ShapeError, TapeserveError
from service.workers import transport


def roundtrip(message: Any) -> Any:
    left, right = multiprocessing.get_context("spawn").Pipe()
    # Send from a thread: a large message fills the pipe before anyone reads it.
    sender = threading.Thread(target=transport.send, args=(left, transport.encode(message)))
    sender.start()
    try:
        return transport.receive(right)
    finally:
        sender.join()
        left.close()
        right.close()


def test_small_messages_are_one_frame_without_arrays_in_the_pickle_stream() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    (frame,) = transport.encode({"x": x})
    assert transport.is_single_frame([frame]) and transport.is_inline(frame.tobytes())
    # The array's bytes appear once, as a raw buffer beside the stream, not pickled inside it.
    assert frame.tobytes().count(x.tobytes()) == 1 and len(frame) < 400 + x.nbytes


def test_large_arrays_travel_out_of_band() -> None:
    x = np.arange(transport.INLINE_MAX_BYTES, dtype=np.float32)
    frames = transport.encode({"x": x})
    # One head frame plus the array's own memory, not a copy inside the pickle stream.
    assert len(frames) == 2 and frames[1].nbytes == x.nbytes
    assert len(frames[0]) < 400 and not transport.is_inline(frames[0].tobytes())


def test_roundtrip_keeps_values_dtypes_and_layout() -> None:
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    message: dict[str, Any] = {
        "c": x,
        "f": np.asfortranarray(x),
        "strided": x[:, ::2],  # not contiguous: travels in-band, still correct
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.float32(2.5),
        "text": "sum(x**2)",
    }
    back = roundtrip(message)
    assert isinstance(back, dict)
    for key in ("c", "f", "strided", "empty"):
        assert back[key].dtype == message[key].dtype
        np.testing.assert_array_equal(back[key], message[key])
        assert back[key].flags.writeable
    assert back["scalar"] == np.float32(2.5) and back["text"] == "sum(x**2)"


def test_large_array() -> None:
    x = np.random.default_rng(0).standard_normal(2_000_000)  # 16 MB, far beyond a pipe's buffer
    back = roundtrip(("job", 1, x))
    assert isinstance(back, tuple)
    np.testing.assert_array_equal(back[2], x)


def test_errors_cross_as_problem_dicts() -> None:
    error = ShapeError("bad shapes", left=[2])
    rebuilt = TapeserveError.from_dict(roundtrip(error.to_dict()))
    assert type(rebuilt) is ShapeError and rebuilt.extra == {"left": [2]}
    assert type(pickle.loads(pickle.dumps(error))) is ShapeError  # noqa: S301 - our own bytes
