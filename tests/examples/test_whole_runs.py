"""examples/whole_runs.py through a live server, on small sizes, against numpy.

The references are numpy on hand-written gradients (rosen's by hand, -P q for the Gaussian), never
the service's. Everything is float64 and both sides do the same arithmetic in a different order of
rounding: measured, the one-request runs and the numpy loops agree to ~3e-16 (Adam, 100 steps, with
the float32 learning rate and bias-correction betas the service's Keras step uses, which
``whole_runs.adam`` copies) and ~1e-15 (20 leapfrog steps, a stable linear map: eps * sqrt(max
eigenvalue of P) = 0.44 < 2, so rounding does not grow). TOLERANCE = 1e-9 relative to max(1, |x|)
leaves ample room for another BLAS or summation order and still fails on any real difference: a
float32 step anywhere, a wrong bias correction or a missing half-kick is >= 1e-8.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from examples import whole_runs as wr
from service.client import Client
from tests.conftest import LiveServer

TOLERANCE = 1e-9


def assert_close(actual: object, expected: object, what: str) -> None:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    error = float(np.max(np.abs(a - e) / np.maximum(1.0, np.abs(e))))
    assert error <= TOLERANCE, f"{what}: error {error:.3g} > {TOLERANCE}"


@pytest.fixture(scope="module")
def client(ready_server: LiveServer) -> Iterator[Client]:
    with Client(ready_server.url, timeout=120) as c:
        yield c


def test_reference_gradients_are_right() -> None:
    """The numpy references themselves: rosen's hand-written gradient against central differences
    (h = 1e-6: error ~h**2 * f''' + 1e-16 * |f| / h, ~1e-7 here, so rtol 1e-6), and the AR(1)
    precision against the inverse of its covariance (exact tridiagonal form: inversion rounding only)."""
    x = np.array([0.3, -0.7, 1.1, 0.2, 0.9])

    def rosen(v: np.ndarray) -> float:
        return float(np.sum(100 * (v[1:] - v[:-1] ** 2) ** 2 + (1 - v[:-1]) ** 2))

    h = 1e-6
    numeric = np.array([(rosen(x + h * e) - rosen(x - h * e)) / (2 * h) for e in np.eye(len(x))])
    np.testing.assert_allclose(wr.rosen_gradient(x), numeric, rtol=1e-6, atol=1e-6)
    d, rho = 6, 0.8
    covariance = rho ** np.abs(np.subtract.outer(np.arange(d), np.arange(d)))
    np.testing.assert_allclose(wr.ar1_precision(d, rho), np.linalg.inv(covariance), atol=1e-12)


def test_adam_run_in_one_request_equals_numpy_and_sequential(client: Client) -> None:
    x0 = np.array([-1.2, 1.0, 0.5, -0.3])
    steps = 15
    reference = wr.adam(wr.rosen_gradient, x0, steps)
    one = wr.adam_one_request(client, x0, steps)
    assert_close(one, reference, "one /v1/step request vs numpy Adam")
    assert_close(wr.adam_sequential(client, x0, steps), one, "gradient requests + numpy Adam vs one request")
    assert not np.allclose(one, x0), "the run moved nowhere: the comparison would prove nothing"


def test_leapfrog_trajectory_in_one_request_equals_numpy_and_sequential(client: Client) -> None:
    d, steps, eps = 4, 5, 0.2
    precision = wr.ar1_precision(d, 0.7)
    rng = np.random.default_rng(1)
    q0, p0 = rng.standard_normal(d), rng.standard_normal(d)
    reference = np.hstack(wr.leapfrog(lambda q: -precision @ q, q0, p0, eps, steps))
    one = np.hstack(wr.hmc_one_request(client, q0, p0, precision, eps, steps))
    assert_close(one, reference, "one fori request vs numpy leapfrog")
    sequential = np.hstack(wr.hmc_sequential(client, q0, p0, precision, eps, steps))
    assert_close(sequential, one, "gradient requests + numpy leapfrog vs one request")

    # Leapfrog is symplectic: the energy error stays ~eps**2 * max eigenvalue of P / 8 relative
    # (0.04 * 5.7 / 8 = 0.03 here, rho = 0.7), never the drift of a non-symplectic integrator.
    def energy(z: np.ndarray) -> float:
        q, p = z[:d], z[d:]
        return float(0.5 * q @ precision @ q + 0.5 * p @ p)

    assert abs(energy(one) - energy(np.hstack([q0, p0]))) < 0.1 * energy(np.hstack([q0, p0]))
