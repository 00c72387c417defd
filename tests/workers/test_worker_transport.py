"""The pipe protocol: numpy arrays cross as raw buffers and come back equal and writable."""

from __future__ import annotations

import dataclasses
import multiprocessing
import pickle
import threading
from typing import Any

import numpy as np
import pytest

from service.errors import ShapeError, TapeserveError
from service.jobs import (
    ExpressionStepJob,
    ExpressionStepResult,
    GradientJob,
    GradientResult,
    ModelGradientJob,
    ModelGradientResult,
    StepRecord,
    TrainStepJob,
    TrainStepResult,
)
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


def _arrays_equal(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a.dtype == b.dtype and np.shape(a) == np.shape(b) and np.array_equal(a, b)


def test_gradient_jobs_cross_whole_with_small_arrays_packed_and_large_ones_out_of_band() -> None:
    big = np.arange(100_000, dtype=np.float64).reshape(1000, 100)
    job = GradientJob(
        expression="sum(x*c) + f(y)",
        variables={"x": np.linspace(0, 1, 10, dtype=np.float32), "y": big},
        constants={"c": np.float32(2.5)},
        functions={"f": {"params": ["a"], "body": "sum(a)", "gradient": None}},
        derivatives=("gradient", "hvp", "vjp"),
        wrt=("x",),
        tangents={"x": np.ones(10, np.float32)},
        cotangent=np.ones((), np.float32),
        order=None,
        batch=False,
        dtype="float32",
    )
    frames = transport.encode(("job", 1, job))
    assert len(frames) > 1 and any(f.nbytes == big.nbytes for f in frames)  # the large one is out of band
    _, _, back = roundtrip(("job", 1, job))
    assert back.signature() == job.signature()
    for name in ("variables", "constants", "tangents"):
        sent, got = getattr(job, name), getattr(back, name)
        assert sent.keys() == got.keys() and all(_arrays_equal(sent[k], got[k]) for k in sent)
    assert _arrays_equal(job.cotangent, back.cotangent)
    assert back.variables["x"].flags.writeable and back.variables["y"].flags.writeable
    assert (back.functions, back.derivatives, back.wrt, back.dtype) == (
        job.functions, job.derivatives, job.wrt, job.dtype,
    )  # fmt: skip


def test_gradient_results_cross_whole() -> None:
    result = GradientResult(
        value=np.float64(1.5),
        gradient={"x": np.array([1.0, -2.0])},
        hessian={"x": {"x": np.array([[2.0, 0.5], [0.5, 1.0]])}},
        jvp=np.array([0.25, 4.0]),
        higher={"variable": "x", "order": 2, "derivatives": [np.ones(2), np.eye(2)]},
        cache="hit",
        compute_ms=0.42,
    )
    back = roundtrip(("result", 7, result, 512.0))[2]
    assert _arrays_equal(back.value, result.value) and _arrays_equal(back.jvp, result.jvp)
    assert _arrays_equal(back.gradient["x"], result.gradient["x"])
    assert _arrays_equal(back.hessian["x"]["x"], result.hessian["x"]["x"])
    pairs = zip(back.higher["derivatives"], result.higher["derivatives"], strict=True)
    assert back.higher["order"] == 2 and all(_arrays_equal(a, b) for a, b in pairs)
    assert (back.jacobian, back.hvp, back.vjp, back.cache, back.compute_ms) == (None, None, None, "hit", 0.42)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray | np.generic):
        return _arrays_equal(a, b)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _training_messages() -> list[Any]:
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(32, 64)).astype(np.float32), np.zeros(64, np.float32)]
    state = [np.ones((), np.int64), rng.normal(size=(32, 64)).astype(np.float32)]
    x = rng.normal(size=(64, 32)).astype(np.float32)  # over the packing size: out of band
    record = StepRecord(1.0, 0.9, 0.1, 2.0, 1.0)
    model = {"input_shape": [32], "layers": [{"type": "dense", "units": 64}], "seed": 0}
    return [
        TrainStepJob(model, x, x[:, :1], weights, {"type": "adam"}, state, {"type": "mse"}, {"norm": 1.0},
                     actions=np.arange(3), returns=np.ones(3), steps=5, dtype="float32"),  # fmt: skip
        TrainStepResult([record], weights, state, gradients=None, cache="hit", compute_ms=1.5),
        ModelGradientJob(model, x, None, None, {"type": "mse"}, wrt=("inputs",), tangents=weights),
        ModelGradientResult(1.0, 0.5, 0.5, weights=weights, input_gradients=x, x_adv=None),
        ExpressionStepJob("sum(w**2)", {"w": np.ones(3)}, {"c": np.float64(2.0)}, optimizer_state=state),
        ExpressionStepResult([record], {"w": np.ones(3)}, state),
    ]


@pytest.mark.parametrize("message", _training_messages(), ids=lambda m: type(m).__name__)
def test_training_jobs_and_results_cross_whole(message: Any) -> None:
    back = roundtrip(("job", 1, message))[2]
    assert type(back) is type(message)
    for f in dataclasses.fields(message):
        assert _same(getattr(message, f.name), getattr(back, f.name)), f.name
