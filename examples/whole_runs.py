"""Whole runs in one request: an Adam run and an HMC trajectory, against one gradient request per step.

A client that drives an optimizer or a sampler through a gradient service pays one HTTP round trip
per gradient. With loops in the language (`fori`, `grad`, see docs/language.md) and `POST /v1/step`
(docs/models.md) the whole run is one request:

- **Adam on rosen10**: ``POST /v1/step`` with ``"steps": 100`` runs 100 clipped Adam steps in the
  worker. The sequential form asks ``POST /v1/gradient`` 100 times and does the same Adam update
  (Keras 3's formulas, clip by global norm) in numpy between the calls.
- **An HMC trajectory**: L leapfrog steps of the Hamiltonian dynamics of a 10-d correlated Gaussian
  (AR(1) covariance rho^|i-j|, written through its exact tridiagonal precision matrix) as ONE
  expression, ``fori(L, leap, z0, P, eps)`` whose step calls ``grad(logp, q, P)``; the state
  ``z = [q, p]`` is one carry. The sequential form asks for the gradient of log p L + 1 times (the
  one at the start, then one after each drift: each step's closing half-kick reuses it for the next
  step's opening half-kick) and does the leapfrog arithmetic in numpy.

Run against a server (``make run`` in another shell)::

    python -m examples.whole_runs            # TAPESERVE_URL or http://127.0.0.1:8000

Everything is float64. The numpy references here (`rosen_gradient`, `adam`, `leapfrog`) are what
tests/examples/test_whole_runs.py and bench/run.py compare the one-request answers with.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from service.client import Client

DTYPE = "float64"
ROSEN = "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)"
ADAM = {"type": "adam", "learning_rate": 0.01, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}
CLIP = {"global_norm": 10.0}

Gradient = Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------------------------
# Adam on the Rosenbrock function
# ---------------------------------------------------------------------------------------------


def rosen_gradient(x: np.ndarray) -> np.ndarray:
    """The gradient of sum(100 (x[i+1] - x[i]^2)^2 + (1 - x[i])^2), written out by hand."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    r = x[1:] - x[:-1] ** 2
    g[:-1] += -400.0 * x[:-1] * r - 2.0 * (1.0 - x[:-1])
    g[1:] += 200.0 * r
    return g


def adam(
    gradient: Gradient,
    x0: np.ndarray,
    steps: int,
    optimizer: dict[str, Any] = ADAM,
    clip_global_norm: float | None = CLIP["global_norm"],
    keras_rounding: bool = True,
) -> np.ndarray:
    """``steps`` Adam steps from x0 with Keras 3's update, in numpy; one ``gradient(x)`` call per step.

    Keras 3 (keras/src/optimizers/adam.py): with t = iteration + 1,
    alpha = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t); m += (g - m) * (1 - beta_1);
    v += (g**2 - v) * (1 - beta_2); x -= m * alpha / (sqrt(v) + epsilon). Clipping by global norm
    scales g by clip / max(|g|, clip) first (tf.clip_by_global_norm).

    ``keras_rounding``: the service's float64 step holds the learning rate in float32 (Keras'
    learning-rate variable has the float32 floatx) and forms the bias corrections from float32 betas,
    while m, v and x stay float64. Measured against ``POST /v1/step``: with this rounding the two
    agree to ~3e-16 after 100 steps; without it they differ by ~5e-6 (float32(0.999) is 1.3e-8 off,
    which moves sqrt(1 - beta_2) by 6e-6 relative, and every step's size with it).
    """
    lr, b1, b2, eps = (float(optimizer[k]) for k in ("learning_rate", "beta_1", "beta_2", "epsilon"))
    lr32, b1_32, b2_32 = (float(np.float32(v)) if keras_rounding else v for v in (lr, b1, b2))
    x = np.array(x0, np.float64)
    m, v = np.zeros_like(x), np.zeros_like(x)
    for t in range(1, steps + 1):
        g = np.asarray(gradient(x), np.float64)
        if clip_global_norm is not None:
            g = g * (clip_global_norm / max(float(np.sqrt(np.sum(g * g))), clip_global_norm))
        alpha = lr32 * np.sqrt(1.0 - b2_32**t) / (1.0 - b1_32**t)
        m += (g - m) * (1.0 - b1)
        v += (g * g - v) * (1.0 - b2)
        x -= m * alpha / (np.sqrt(v) + eps)
    return x


def adam_request(x0: np.ndarray, steps: int) -> dict[str, Any]:
    """The body of ``POST /v1/step`` for ``steps`` clipped Adam steps on rosen from x0."""
    return {"expression": ROSEN, "variables": {"x": np.asarray(x0, np.float64).tolist()},
            "optimizer": ADAM, "clip": CLIP, "steps": steps, "dtype": DTYPE}  # fmt: skip


def gradient_request(expression: str, name: str, value: np.ndarray, **extra: Any) -> dict[str, Any]:
    """The body of ``POST /v1/gradient`` for the gradient of ``expression`` in one variable."""
    return {"expression": expression, "variables": {name: np.asarray(value, np.float64).tolist()},
            "dtype": DTYPE, **extra}  # fmt: skip


def adam_one_request(client: Client, x0: np.ndarray, steps: int) -> np.ndarray:
    """The whole Adam run as one ``POST /v1/step``."""
    result = client.step(ROSEN, {"x": np.asarray(x0, np.float64)}, optimizer=ADAM, clip=CLIP,
                         steps=steps, dtype=DTYPE)  # fmt: skip
    return np.asarray(result.variables["x"], np.float64)


def adam_sequential(client: Client, x0: np.ndarray, steps: int) -> np.ndarray:
    """The same run as ``steps`` gradient requests, the Adam update done here in numpy."""

    def gradient(x: np.ndarray) -> np.ndarray:
        return np.asarray(client.gradient(ROSEN, {"x": x}, dtype=DTYPE)["x"], np.float64)

    return adam(gradient, x0, steps)


# ---------------------------------------------------------------------------------------------
# An HMC trajectory (leapfrog) on a correlated Gaussian
# ---------------------------------------------------------------------------------------------

LOGP = "-0.5 * sum(q[:, None] * P * q[None, :])"  # log density up to a constant: -q'Pq / 2


def ar1_precision(d: int, rho: float) -> np.ndarray:
    """The inverse of the AR(1) covariance rho^|i-j|: tridiagonal, symmetric by construction."""
    p = np.zeros((d, d))
    idx = np.arange(d)
    p[idx, idx] = 1.0 + rho**2
    p[0, 0] = p[-1, -1] = 1.0
    p[idx[:-1], idx[1:]] = p[idx[1:], idx[:-1]] = -rho
    return p / (1.0 - rho**2)


def hmc_functions(d: int) -> dict[str, Any]:
    """User functions for one leapfrog step on the state z = [q (d), p (d)]."""
    return {
        "logp": {"params": ["q", "P"], "body": LOGP},
        "kick": {"params": ["z", "P", "h"],
                 "body": f"concatenate([z[:{d}], z[{d}:] + h * grad(logp, z[:{d}], P)])"},
        "drift": {"params": ["z", "h"], "body": f"concatenate([z[:{d}] + h * z[{d}:], z[{d}:]])"},
        "leap": {"params": ["i", "z", "P", "eps"],
                 "body": "kick(drift(kick(z, P, 0.5 * eps), eps), P, 0.5 * eps)"},
    }  # fmt: skip


def trajectory_request(
    q0: np.ndarray, p0: np.ndarray, precision: np.ndarray, eps: float, steps: int
) -> dict[str, Any]:
    """The body of ``POST /v1/gradient`` whose value is the state [q, p] after ``steps`` leapfrog steps.

    ``"derivatives": []`` asks for the value only: the trajectory is not differentiated again.
    """
    z0 = np.concatenate([np.asarray(q0, np.float64), np.asarray(p0, np.float64)])
    return {"expression": f"fori({steps}, leap, z0, P, eps)", "variables": {"z0": z0.tolist()},
            "constants": {"P": np.asarray(precision, np.float64).tolist(), "eps": float(eps)},
            "functions": hmc_functions(len(q0)), "derivatives": [], "dtype": DTYPE}  # fmt: skip


def leapfrog(
    grad_logp: Gradient, q0: np.ndarray, p0: np.ndarray, eps: float, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` leapfrog steps (unit mass) with ``steps + 1`` calls of ``grad_logp``."""
    q, p = np.array(q0, np.float64), np.array(p0, np.float64)
    g = np.asarray(grad_logp(q), np.float64)
    for _ in range(steps):
        p = p + 0.5 * eps * g
        q = q + eps * p
        g = np.asarray(grad_logp(q), np.float64)
        p = p + 0.5 * eps * g
    return q, p


def hmc_one_request(client: Client, q0: np.ndarray, p0: np.ndarray, precision: np.ndarray, eps: float,
                    steps: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The whole trajectory as one ``POST /v1/gradient`` (its value)."""
    body = trajectory_request(q0, p0, precision, eps, steps)
    z = np.asarray(client.compute(body["expression"], body["variables"], derivatives=(),
                                  constants=body["constants"], functions=body["functions"],
                                  dtype=DTYPE).value, np.float64)  # fmt: skip
    d = len(q0)
    return z[:d], z[d:]


def hmc_sequential(client: Client, q0: np.ndarray, p0: np.ndarray, precision: np.ndarray, eps: float,
                   steps: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The same trajectory as ``steps + 1`` gradient requests, the leapfrog arithmetic in numpy."""

    def grad_logp(q: np.ndarray) -> np.ndarray:
        return np.asarray(client.gradient(LOGP, {"q": q}, constants={"P": precision}, dtype=DTYPE)["q"])

    return leapfrog(grad_logp, q0, p0, eps, steps)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    url = os.environ.get("TAPESERVE_URL", "http://127.0.0.1:8000")
    x0 = np.array([0.1 * i for i in range(10)])
    rng = np.random.default_rng(0)
    precision, q0, p0 = ar1_precision(10, 0.9), rng.standard_normal(10), rng.standard_normal(10)
    with Client(url, timeout=120) as client:
        for name, run in [
            ("100 Adam steps, one request", lambda: adam_one_request(client, x0, 100)),
            ("100 Adam steps, 100 gradient requests", lambda: adam_sequential(client, x0, 100)),
            ("20 leapfrog steps, one request", lambda: hmc_one_request(client, q0, p0, precision, 0.1, 20)),
            ("20 leapfrog steps, 21 gradient requests",
             lambda: hmc_sequential(client, q0, p0, precision, 0.1, 20)),
        ]:  # fmt: skip
            run()  # the first call compiles the program
            start = time.perf_counter()
            out = run()
            print(f"{name:<42} {(time.perf_counter() - start) * 1000:8.1f} ms  {np.hstack(out)[:3]} ...")
    reference = adam(rosen_gradient, x0, 100)
    q, p = leapfrog(lambda q: -precision @ q, q0, p0, 0.1, 20)
    print(f"numpy references: Adam {reference[:3]} ..., leapfrog {np.hstack([q, p])[:3]} ...")


if __name__ == "__main__":
    main()
