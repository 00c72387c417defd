"""Called once in each worker before it reports ready: imports TensorFlow and Keras, runs a tiny program."""

from __future__ import annotations

import gc

import numpy as np

from service.engine import execute
from service.jobs import GradientJob


def warmup() -> None:
    # One small gradient+Hessian pulls in TF's kernels and tracing machinery (~1 s), so the first
    # real request does not pay for it.
    execute(GradientJob("sum(x**2)", {"x": np.zeros(2, np.float32)}, derivatives=("gradient", "hessian")))
    # Keras takes seconds to import; the first model request should not wait for it.
    import service.models.keras_build  # noqa: F401

    # TensorFlow and Keras leave ~3x10^5 objects that live as long as the worker. Frozen out of the
    # collector's reach, they no longer make each full collection (tracing allocates enough to
    # trigger one every ~15 cold programs) a ~130 ms pause inside a request; it scans only what
    # jobs created since (measured: rosen10 gradient+Hessian, 30 cold programs, one at 210 ms
    # among 72-99 ms before, none after).
    gc.collect()
    gc.freeze()
