"""The UM-Bridge peer of `make bench-peers`: UM-Bridge's own Python server with a tf.function model.

``python bench/umbridge_peer.py PORT`` serves one model, ``rosen10``, with ``umbridge.serve_models``
(aiohttp; each call runs on its one-thread executor): input one vector of 10, output the
Rosenbrock value (size 1). ``Gradient`` is sens * d rosen / dx from a ``tf.GradientTape`` inside a
``tf.function`` traced once for float64 [10] (the same rosen10 gradient as the in-process floor of
bench/run.py). This is how a UM-Bridge user would serve a TensorFlow model: one process, TensorFlow
in it, no worker hop.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf
import umbridge
import umbridge.um

SPEC = [tf.TensorSpec([10], tf.float64)]


def rosen(x: Any) -> Any:
    return tf.reduce_sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)


@tf.function(input_signature=SPEC)
def value(x: Any) -> Any:
    return rosen(x)


@tf.function(input_signature=SPEC)
def value_and_gradient(x: Any) -> Any:
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = rosen(x)
    return y, tape.gradient(y, x)


class Rosen10(umbridge.Model):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__("rosen10")

    def get_input_sizes(self, config: dict[str, Any] | None = None) -> list[int]:
        return [10]

    def get_output_sizes(self, config: dict[str, Any] | None = None) -> list[int]:
        return [1]

    def __call__(
        self, parameters: list[list[float]], config: dict[str, Any] | None = None
    ) -> list[list[float]]:
        return [[float(value(tf.constant(parameters[0], tf.float64)))]]

    def gradient(
        self, out_wrt: int, in_wrt: int, parameters: list[list[float]], sens: list[float],
        config: dict[str, Any] | None = None,
    ) -> list[float]:  # fmt: skip
        _, g = value_and_gradient(tf.constant(parameters[0], tf.float64))
        out: list[float] = (float(sens[0]) * g.numpy()).tolist()
        return out

    def supports_evaluate(self) -> bool:
        return True

    def supports_gradient(self) -> bool:
        return True


if __name__ == "__main__":
    model = Rosen10()
    model.gradient(0, 0, [[0.0] * 10], [1.0])  # trace before the server answers /Info
    # serve_models calls aiohttp's run_app without a host (all interfaces); the bench needs loopback only.
    umbridge.um.web.run_app = functools.partial(umbridge.um.web.run_app, host="127.0.0.1")
    umbridge.serve_models([model], port=int(sys.argv[1]))
