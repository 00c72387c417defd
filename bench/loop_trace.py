"""Trace (compile) time of loops against their trip count: fori RK4 and an LSTM-like scan.

``python -m bench.loop_trace``: prints cold compile_ms (tracing one program) and warm compute_ms
per trip count, for the gradient and for gradient + Hessian. The step is traced once, so compile
time should not depend on the trip count; run time grows linearly with it.
"""

from __future__ import annotations

import json
import time

import numpy as np

from service.engine.runner import _compile
from service.jobs import GradientJob
from service.limits import Limits

RK4 = {
    "rhs": {"params": ["y", "a"], "body": "sin(a * y)"},
    "stages": {
        "params": ["y", "a", "h", "k1", "k2"],
        "body": "k1 + 2 * k2 + 2 * rhs(y + h / 2 * k2, a) + rhs(y + h * rhs(y + h / 2 * k2, a), a)",
    },
    "rk4": {
        "params": ["i", "y", "a", "h"],
        "body": "y + h / 6 * stages(y, a, h, rhs(y, a), rhs(y + h / 2 * rhs(y, a), a))",
    },
}
# A diagonal LSTM cell (GradBench's variant), the state [h; c] packed in one carry.
LSTM = {
    "cell": {
        "params": ["s", "x", "w", "b"],
        "body": "stack([sigmoid(w[0] * x + b[0]) * tanh(sigmoid(w[1] * s[1] + b[1]) * s[1]"
        " + sigmoid(w[2] * x + b[2]) * tanh(w[3] * s[0] + b[3])), sigmoid(w[1] * s[1] + b[1]) * s[1]"
        " + sigmoid(w[2] * x + b[2]) * tanh(w[3] * s[0] + b[3])])",
    },
}


def measure(job: GradientJob) -> tuple[float, float]:
    start = time.perf_counter()
    program = _compile(job, Limits())
    compile_ms = (time.perf_counter() - start) * 1000
    import tensorflow as tf

    inputs = [tf.constant(getattr(job, g)[n]) for g, n in program.inputs]
    program.call(*inputs)
    start = time.perf_counter()
    program.call(*inputs)
    return compile_ms, (time.perf_counter() - start) * 1000


def main() -> None:
    rows = []
    for steps in (1, 100, 1_000, 10_000):
        for derivatives in (("gradient",), ("gradient", "hessian")):
            rk4 = GradientJob(
                expression=f"sum(fori({steps}, rk4, y0, a, 0.01))",
                variables={"y0": np.ones(4), "a": np.linspace(0.5, 1.0, 4)},
                functions=RK4,
                derivatives=derivatives,
                dtype="float64",
            )
            compile_ms, run_ms = measure(rk4)
            rows.append({"loop": "fori rk4", "steps": steps, "derivatives": derivatives,
                         "compile_ms": round(compile_ms), "warm_ms": round(run_ms, 2)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        lstm = GradientJob(
            expression="sum(scan(cell, zeros([2, 8]), xs, w, b)[-1])",
            variables={"w": np.full((4, 8), 0.3), "b": np.full((4, 8), 0.1)},
            constants={"xs": np.sin(np.arange(steps * 8.0)).reshape(steps, 8)},
            functions=LSTM,
            derivatives=("gradient",),
            dtype="float64",
        )
        compile_ms, run_ms = measure(lstm)
        rows.append({"loop": "scan lstm", "steps": steps, "derivatives": ["gradient"],
                     "compile_ms": round(compile_ms), "warm_ms": round(run_ms, 2)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
