"""GradBench's evals as tapeserve requests (examples/gradbench), on small sizes, through a live server.

Each eval's answer is compared with an independent value: a closed form or float64 central finite
differences of a numpy implementation written here from the eval's definition, never from the
example's expression. The bound is GradBench's own check, |x - y| / max(1, |x| + |y|) <= 1e-4
elementwise: these tests ask whether the example passes the benchmark's validator, and the finite
differences below (h = 1e-6, truncation ~h**2 times a third derivative, rounding ~1e-16 / h) are
accurate to ~1e-8, far inside it.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from examples.gradbench import ba, det, gmm, hello, ht, kmeans, llsq, lse, lstm, ode, particle, saddle, tool
from service.client import Client
from tests.conftest import LiveServer

GRADBENCH_TOLERANCE = 1e-4
STEP = 1e-6  # central differences in float64: truncation ~h**2 balanced against rounding ~1e-16 / h


def assert_gradbench_close(actual: Any, expected: Any, what: str) -> None:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    error = np.abs(a - e) / np.maximum(1.0, np.abs(a) + np.abs(e))
    worst = float(np.max(error, initial=0.0))
    assert worst <= GRADBENCH_TOLERANCE, f"{what}: GradBench error {worst:.3g} > {GRADBENCH_TOLERANCE}"


def assert_same_iterates(actual: Any, expected: Any, what: str) -> None:
    """A solver's iterates against the same rules run in numpy, relative 1e-6: both take the same
    accept/reject decisions, so they differ only by their gradients (exact vs central differences,
    ~1e-8 relative) carried through a few dozen steps. GradBench's bound (1e-4 absolute below 1)
    would not notice a wrong step of a solver that has moved only 0.003."""
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=1e-6, err_msg=what
    )


def central_difference(fn: Callable[[np.ndarray], float], x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += STEP
        down[index] -= STEP
        out[index] = (fn(up) - fn(down)) / (2 * STEP)
    return out


@pytest.fixture(scope="module")
def client(ready_server: LiveServer) -> Iterator[Client]:
    with Client(ready_server.url, timeout=120) as c:
        yield c


def test_hello(client: Client) -> None:
    assert_gradbench_close(hello.FUNCTIONS["square"](client, 1.5), 2.25, "square")
    assert_gradbench_close(hello.FUNCTIONS["double"](client, 2.25), 4.5, "double")


def test_lse(client: Client) -> None:
    # large entries: exp(x) overflows float64, so only a stable formula gives these closed forms
    x = np.array([1000.0, 999.0, 998.5, -3.0, 1000.0])
    expected = 1000.0 + math.log(np.sum(np.exp(x - 1000.0)))
    assert_gradbench_close(lse.FUNCTIONS["primal"](client, {"x": x.tolist()}), expected, "primal")
    softmax = np.exp(x - expected)
    assert_gradbench_close(lse.FUNCTIONS["gradient"](client, {"x": x.tolist()}), softmax, "gradient")


def test_llsq(client: Client) -> None:
    n, m = 9, 4
    x = np.array([0.3, -0.2, 0.7, 0.1])
    t = -1 + np.arange(n) * 2 / (n - 1)
    residual = np.sign(t) - np.vander(t, m, increasing=True) @ x
    input = {"x": x.tolist(), "n": n}
    assert_gradbench_close(llsq.FUNCTIONS["primal"](client, input), 0.5 * residual @ residual, "primal")
    gradient = -np.vander(t, m, increasing=True).T @ residual
    assert_gradbench_close(llsq.FUNCTIONS["gradient"](client, input), gradient, "gradient")


def _det_by_minors(a: np.ndarray) -> float:
    if a.shape[0] == 1:
        return float(a[0, 0])
    return sum(
        (-1) ** j * a[0, j] * _det_by_minors(np.delete(np.delete(a, 0, 0), j, 1)) for j in range(a.shape[0])
    )


def test_det(client: Client) -> None:
    ell = 4
    a = np.random.default_rng(5).uniform(size=(ell, ell))
    input = {"A": a.ravel().tolist(), "ell": ell}
    assert_gradbench_close(det.FUNCTIONS["primal"](client, input), _det_by_minors(a), "primal")
    # the gradient entry (i, j) is the cofactor: (-1)**(i+j) times the minor's determinant
    cofactors = [
        (-1) ** (i + j) * _det_by_minors(np.delete(np.delete(a, i, 0), j, 1))
        for i, j in itertools.product(range(ell), repeat=2)
    ]
    assert_gradbench_close(det.FUNCTIONS["gradient"](client, input), cofactors, "gradient")


def test_kmeans(client: Client) -> None:
    rng = np.random.default_rng(7)
    points = rng.uniform(size=(40, 3))
    centroids = points[-4:].copy()  # as GradBench does: every centroid has a point of its own
    input = {"points": points.tolist(), "centroids": centroids.tolist()}
    distances = np.sum((points[:, None, :] - centroids[None, :, :]) ** 2, axis=2)
    assert_gradbench_close(kmeans.FUNCTIONS["cost"](client, input), np.sum(np.min(distances, axis=1)), "cost")
    # J_j = 2 sum_{i in j} (C_j - P_i) and H_j = 2 |j| on the diagonal: dir_j = C_j - mean of cluster j
    nearest = np.argmin(distances, axis=1)
    expected = np.array([centroids[j] - points[nearest == j].mean(axis=0) for j in range(4)])
    assert_gradbench_close(kmeans.FUNCTIONS["dir"](client, input), expected, "dir")


def _gmm_log_posterior(
    d: int, k: int, x: np.ndarray, m: int, gamma: float, params: dict[str, np.ndarray]
) -> float:
    """The definition, naively: densities multiplied, Wishart prior on Q^T Q, logarithm at the end."""
    alpha, mu, q, lower = params["alpha"], params["mu"], params["q"], params["l"]
    phi = np.exp(alpha) / np.sum(np.exp(alpha))
    precisions = []
    for c in range(k):
        qmat = np.diag(np.exp(q[c]))
        below = iter(lower[c])
        for j in range(d):  # column by column under the diagonal
            for i in range(j + 1, d):
                qmat[i, j] = next(below)
        precisions.append(qmat.T @ qmat)
    likelihood = 1.0
    for xi in x:
        likelihood *= sum(
            phi[c]
            * math.exp(-0.5 * (xi - mu[c]) @ precisions[c] @ (xi - mu[c]))
            / math.sqrt((2 * math.pi) ** d / np.linalg.det(precisions[c]))
            for c in range(k)
        )
    dof = d + m + 1
    log_gamma_d = d * (d - 1) / 4 * math.log(math.pi) + sum(
        math.lgamma(dof / 2 + (1 - j) / 2) for j in range(1, d + 1)
    )
    prior = 1.0
    for p_c in precisions:
        prior *= (np.linalg.det(p_c) ** ((dof - d - 1) / 2) * math.exp(-0.5 * gamma**2 * np.trace(p_c))) / (
            2 ** (dof * d / 2) * gamma ** (-dof * d) * math.exp(log_gamma_d)
        )
    return math.log(likelihood * prior)


def test_gmm(client: Client) -> None:
    d, k, n, m, gamma = 3, 2, 6, 1, 1.3
    rng = np.random.default_rng(11)
    x = rng.normal(size=(n, d))
    params = {
        "alpha": rng.normal(size=k),
        "mu": rng.uniform(size=(k, d)),
        "q": 0.3 * rng.normal(size=(k, d)),
        "l": 0.3 * rng.normal(size=(k, d * (d - 1) // 2)),
    }
    input = {"d": d, "k": k, "n": n, "m": m, "gamma": gamma, "x": x.tolist()} | {
        name: value.tolist() for name, value in params.items()
    }
    expected = _gmm_log_posterior(d, k, x, m, gamma, params)
    assert_gradbench_close(gmm.FUNCTIONS["objective"](client, input), expected, "objective")
    jacobian = gmm.FUNCTIONS["jacobian"](client, input)
    for name in gmm.INDEPENDENT:
        fd = central_difference(
            lambda v, name=name: _gmm_log_posterior(d, k, x, m, gamma, params | {name: v}), params[name]
        )
        assert_gradbench_close(jacobian[name], fd, f"d/d{name}")


def _ba_residuals(cam: np.ndarray, X: np.ndarray, w: float, feat: np.ndarray) -> np.ndarray:
    """One observation's (reproj_err[0], reproj_err[1], w_err), from the rotation matrix of rot."""
    rot, center, focal, principal, radial = cam[0:3], cam[3:6], cam[6], cam[7:9], cam[9:11]
    theta = np.linalg.norm(rot)
    if theta == 0:
        rotated = (X - center) + np.cross(rot, X - center)
    else:
        k = rot / theta
        skew = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        rotation = np.eye(3) + math.sin(theta) * skew + (1 - math.cos(theta)) * skew @ skew
        rotated = rotation @ (X - center)
    proj = rotated[:2] / rotated[2]
    r2 = proj @ proj
    projected = proj * (1 + radial[0] * r2 + radial[1] * r2 * r2) * focal + principal
    return np.concatenate([w * (projected - feat), [1 - w * w]])


def _ba_block_fd(cam: np.ndarray, X: np.ndarray, w: float, feat: np.ndarray) -> dict[str, np.ndarray]:
    """d(residuals)/d(cam, X, w) of one observation by central differences: (3, 11), (3, 3), (3,)."""

    def rows(fn: Callable[[np.ndarray], np.ndarray], at: np.ndarray) -> np.ndarray:
        return np.stack([central_difference(lambda v, i=i: float(fn(v)[i]), at) for i in range(3)])

    return {
        "cam": rows(lambda v: _ba_residuals(v, X, w, feat), cam),
        "X": rows(lambda v: _ba_residuals(cam, v, w, feat), X),
        "w": rows(lambda v: _ba_residuals(cam, X, float(v[0]), feat), np.array([w]))[:, 0],
    }


def _ba_problem(rng: np.random.Generator, n: int, m: int, p: int) -> dict[str, np.ndarray]:
    cams = np.concatenate(
        [0.3 * rng.normal(size=(n, 3)), 0.2 * rng.normal(size=(n, 3)), rng.uniform(1, 2, (n, 1)),
         rng.normal(size=(n, 2)), 0.1 * rng.normal(size=(n, 2))], axis=1)  # fmt: skip
    cams[0, 0:3] = 0.0  # one camera at angle 0: the first-order branch
    X = rng.normal(size=(m, 3)) + np.array([0.0, 0.0, 5.0])  # in front of the cameras
    obs = np.stack([rng.integers(0, n, p), rng.integers(0, m, p)], axis=1)
    obs[0, 0] = 0
    return {
        "cams": cams,
        "X": X,
        "w": rng.uniform(0.5, 1.5, p),
        "feats": rng.normal(size=(p, 2)),
        "obs": obs.astype(np.float64),
    }


def test_ba_errors_and_blocks_against_numpy(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    problem = _ba_problem(rng, n=3, m=5, p=7)
    monkeypatch.setattr(ba, "CHUNK", 4)  # two requests, the second partial: chunks must line up
    obs = problem["obs"].astype(int)
    expected = np.array([
        _ba_residuals(problem["cams"][c], problem["X"][x], problem["w"][j], problem["feats"][j])
        for j, (c, x) in enumerate(obs)
    ])  # fmt: skip
    reproj, w_err = ba.errors(client, problem)
    assert_gradbench_close(reproj, expected[:, :2], "reproj_err")
    assert_gradbench_close(w_err, expected[:, 2], "w_err")
    blocks = ba.blocks(client, problem)
    for j, (c, x) in enumerate(obs):
        cam, X, w, feat = problem["cams"][c], problem["X"][x], problem["w"][j], problem["feats"][j]
        fd = _ba_block_fd(cam, X, w, feat)
        assert_gradbench_close(blocks["cam"][j], fd["cam"], f"observation {j}: d/dcam")
        assert_gradbench_close(blocks["X"][j], fd["X"], f"observation {j}: d/dX")
        assert_gradbench_close(blocks["w"][j], fd["w"], f"observation {j}: d/dw")


def test_ba_gradbench_form(client: Client) -> None:
    # GradBench's input: one of each, duplicated; observation j is camera j mod n, point j mod m
    input = {
        "n": 2, "m": 3, "p": 5,
        "cam": [0.1, -0.2, 0.3, 0.05, 0.1, -0.1, 1.5, 0.2, -0.1, 0.01, -0.02],
        "x": [0.3, -0.4, 4.0], "w": 0.8, "feat": [0.2, 0.1],
    }  # fmt: skip
    cam, X, feat = (np.array(input[key]) for key in ("cam", "x", "feat"))
    expected = _ba_residuals(cam, X, 0.8, feat)
    out = ba.FUNCTIONS["objective"](client, input)
    assert out["reproj_error"]["repeated"] == 5 and out["w_err"]["repeated"] == 5
    assert_gradbench_close(out["reproj_error"]["elements"], expected[:2], "reproj_error")
    assert_gradbench_close(out["w_err"]["element"], expected[2], "w_err")

    matrix = ba.FUNCTIONS["jacobian"](client, input)
    # 2 * 5 reprojection rows of 15 entries, then 5 weight rows of 1; only 30 entries and the last kept
    assert matrix["rows"] == [15 * i for i in range(11)] + [150 + i for i in range(1, 6)] + [155]
    cam_cols, point_cols, weight_col = list(range(11)), [22, 23, 24], 22 + 9  # observation 0
    assert matrix["cols"][:30] == 2 * (cam_cols + point_cols + [weight_col])
    assert matrix["cols"][-1] == 22 + 9 + 4  # the last weight's column
    fd = _ba_block_fd(cam, X, 0.8, feat)
    first_rows = np.concatenate([np.concatenate([fd["cam"][i], fd["X"][i], [fd["w"][i]]]) for i in range(2)])
    assert_gradbench_close(matrix["vals"][:30], first_rows, "first two rows")
    assert_gradbench_close(matrix["vals"][-1], fd["w"][2], "last weight row")


# -- evals with loops and derivatives inside the expression ------------------------------------


def _ode(x: np.ndarray, s: int) -> np.ndarray:
    """s classical Runge-Kutta steps of y0' = x0, yi' = xi y(i-1) from y(0) = 0 to t = 2."""
    y, h = np.zeros_like(x), 2 / s

    def slope(y: np.ndarray) -> np.ndarray:
        return np.concatenate([x[:1], x[1:] * y[:-1]])

    for _ in range(s):
        k1 = slope(y)
        k2 = slope(y + h * k1 / 2)
        k3 = slope(y + h * k2 / 2)
        y = y + h * (k1 + 2 * k2 + 2 * k3 + slope(y + h * k3)) / 6
    return y


def test_ode(client: Client) -> None:
    x = np.random.default_rng(13).uniform(0.5, 1.5, 6)
    input = {"x": x.tolist(), "s": 4}
    assert_gradbench_close(ode.FUNCTIONS["primal"](client, input), _ode(x, 4), "primal")
    expected = central_difference(lambda v: float(_ode(v, 4)[-1]), x)
    assert_gradbench_close(ode.FUNCTIONS["gradient"](client, input), expected, "gradient")


def _lstm_loss(main: np.ndarray, extra: np.ndarray, state: np.ndarray, sequence: np.ndarray) -> float:
    """The definition step by step: each character through every layer, scored against the next one."""
    layers, b = main.shape[0] // 2, main.shape[1] // 4
    hidden, cell = state[0::2].copy(), state[1::2].copy()
    total = 0.0
    for t in range(sequence.shape[0] - 1):
        value = sequence[t] * extra[0]
        for i in range(layers):
            weight, bias = main[2 * i].reshape(4, b), main[2 * i + 1].reshape(4, b)
            forget = 1 / (1 + np.exp(-(value * weight[0] + bias[0])))
            ingate = 1 / (1 + np.exp(-(hidden[i] * weight[1] + bias[1])))
            outgate = 1 / (1 + np.exp(-(value * weight[2] + bias[2])))
            change = np.tanh(hidden[i] * weight[3] + bias[3])
            cell[i] = cell[i] * forget + ingate * change
            hidden[i] = outgate * np.tanh(cell[i])
            value = hidden[i]
        prediction = value * extra[1] + extra[2]
        total += float(sequence[t + 1] @ (prediction - math.log(np.sum(np.exp(prediction)) + 2)))
    return -total / ((sequence.shape[0] - 1) * b)


def test_lstm(client: Client) -> None:
    rng = np.random.default_rng(17)
    layers, b, c = 2, 3, 7
    arrays = {
        "main_params": rng.random((2 * layers, 4 * b)),
        "extra_params": rng.random((3, b)),
        "state": rng.random((2 * layers, b)),
        "sequence": rng.integers(0, 2, (c, b)).astype(np.float64),
    }
    input = {name: value.tolist() for name, value in arrays.items()}
    main, extra = arrays["main_params"], arrays["extra_params"]
    rest = (arrays["state"], arrays["sequence"])
    assert_gradbench_close(
        lstm.FUNCTIONS["objective"](client, input), _lstm_loss(main, extra, *rest), "objective"
    )
    expected = np.concatenate([
        central_difference(lambda v: _lstm_loss(v, extra, *rest), main).ravel(),
        central_difference(lambda v: _lstm_loss(main, v, *rest), extra).ravel(),
    ])  # fmt: skip
    assert_gradbench_close(lstm.FUNCTIONS["jacobian"](client, input), expected, "jacobian")


def _descend(
    f: Callable[[np.ndarray], float], g: Callable[[np.ndarray], np.ndarray], x: np.ndarray, steps: int
) -> np.ndarray:
    """GradBench's solver (README of particle/saddle, tools' solvers), ``steps`` iterations at most."""
    fx, gx, eta, accepted = f(x), g(x), 1e-5, 0
    for _ in range(steps):
        if np.linalg.norm(gx) <= 1e-5:
            break
        if accepted == 10:
            eta, accepted = 2 * eta, 0
            continue
        trial = x - eta * gx
        if np.linalg.norm(trial - x) <= 1e-5:
            break
        f_trial = f(trial)
        if f_trial < fx:
            x, fx, gx, accepted = trial, f_trial, g(trial), accepted + 1
        else:
            eta, accepted = eta / 2, 0
    return x


def test_saddle_solvers_step_for_step(client: Client) -> None:
    # 40 iterations of each solver (not yet converged: every rule is exercised, eta has doubled)
    # against the same rules in numpy. The inner argmax of |p1|^2 - |p|^2 does not depend on p1,
    # so the outer gradient is 2 p1 exactly, through the inner solver or not.
    start = np.array([1.0, 1.0])
    functions, expression = saddle.program(steps=40)
    state = np.asarray(client.compute(expression, {"start": start}, functions=functions, derivatives=(),
                                      dtype="float64").value)  # fmt: skip

    def inner(p1: np.ndarray) -> np.ndarray:
        return _descend(lambda p: -(p1 @ p1 - p @ p), lambda p: 2 * p, start, 40)

    r1 = _descend(lambda p1: p1 @ p1 - inner(p1) @ inner(p1), lambda p1: 2 * p1, start, 40)
    assert_same_iterates(state[0:2], r1, "argmin x after 40 iterations")
    assert_same_iterates(state[8:10], inner(r1), "argmax y after 40 iterations")
    assert np.all(state[0:2] < 0.999) and state[7] == 1.0  # it moved, and it is still running


def test_saddle_stops_where_the_gradient_vanishes(client: Client) -> None:
    # |grad| = 2 |start| <= 1e-5: both solvers stop at once (their running flags drop) and stay
    start = np.array([3e-6, -2e-6])
    functions, expression = saddle.program(steps=5)
    state = np.asarray(client.compute(expression, {"start": start}, functions=functions, derivatives=(),
                                      dtype="float64").value)  # fmt: skip
    assert state[7] == 0.0 and state[15] == 0.0
    np.testing.assert_array_equal(state[0:2], start)
    np.testing.assert_array_equal(state[8:10], start)


def _particle_miss(w: float) -> float:
    charges = [np.array([10.0, 10.0 - w]), np.array([10.0, 0.0])]
    x, velocity = np.array([0.0, 8.0]), np.array([0.75, 0.0])
    while True:
        force = sum((x - c) / np.linalg.norm(x - c) ** 3 for c in charges)  # -grad of sum 1/|x - c|
        moved = x + 0.1 * velocity
        if moved[1] <= 0:
            break
        x, velocity = moved, velocity + 0.1 * force
    return float((x[0] - x[1] / velocity[1] * velocity[0]) ** 2)


def test_particle_trajectory_and_its_derivative(client: Client) -> None:
    functions, _ = particle.program(solver_steps=1)
    for w in (0.0, 0.15):
        result = client.compute("miss(w)", {"w": np.array([w])}, functions=functions, dtype="float64")
        assert_gradbench_close(result.value, _particle_miss(w), f"miss({w})")
        fd = (_particle_miss(w + STEP) - _particle_miss(w - STEP)) / (2 * STEP)
        assert_gradbench_close(result.gradient["w"], [fd], f"d miss / dw at {w}")


def test_particle_solver_step_for_step(client: Client) -> None:
    functions, expression = particle.program(solver_steps=15)
    state = client.compute(
        expression, {"w0": np.array([0.0])}, functions=functions, derivatives=(), dtype="float64"
    )

    def gradient(w: np.ndarray) -> np.ndarray:
        return np.array([(_particle_miss(w[0] + STEP) - _particle_miss(w[0] - STEP)) / (2 * STEP)])

    expected = _descend(lambda w: _particle_miss(float(w[0])), gradient, np.array([0.0]), 15)
    assert_same_iterates(np.asarray(state.value)[0], expected[0], "w after 15 iterations")


# -- ht: the hand model written out bone by bone ------------------------------------------------


def _ht_rotation(axis: int, angle: float) -> np.ndarray:
    """The rotation by ``angle`` about coordinate axis ``axis`` (0 x, 1 y, 2 z)."""
    r = np.eye(3)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r[i, i] = r[j, j] = math.cos(angle)
    r[i, j], r[j, i] = -math.sin(angle), math.sin(angle)
    return r


def _ht_residuals(theta: np.ndarray, model: dict[str, Any], corr: Any, points: Any, us: Any) -> np.ndarray:
    """ADBench's hand objective from its definition: pose table, posed relatives, absolutes by the
    parent chain, linear blend skinning, mirroring, global angle-axis rotation and translation."""
    parents = model["parents"]
    bones = len(parents)
    pose = np.zeros((bones + 3, 3))  # rows: global rotation, scale, translation, then each bone
    pose[0], pose[1], pose[2] = theta[0:3], 1.0, theta[3:6]
    params = iter(theta[6:])
    for finger in range(5):  # bones 2..4 of each finger (after the wrist and the finger's base)
        for k in range(3):
            pose[3 + 2 + 4 * finger + k, 0] = next(params)
            if k == 0:
                pose[3 + 2 + 4 * finger + k, 1] = next(params)
    absolutes: list[np.ndarray] = []
    for b in range(bones):
        angles_x, angles_z, angles_y = pose[3 + b]
        posed = np.eye(4)
        posed[:3, :3] = _ht_rotation(2, angles_z) @ _ht_rotation(1, angles_y) @ _ht_rotation(0, angles_x)
        relative = np.asarray(model["base_relatives"][b]) @ posed
        absolutes.append(relative if parents[b] < 0 else absolutes[parents[b]] @ relative)
    base, weights = np.asarray(model["base_positions"]), np.asarray(model["weights"])
    positions = np.zeros((base.shape[0], 3))
    for b in range(bones):
        transform = absolutes[b] @ np.asarray(model["inverse_base_absolutes"][b])
        positions += weights[:, b : b + 1] * (base @ transform.T)[:, :3]
    if model["is_mirrored"]:
        positions[:, 0] *= -1
    angle = float(np.linalg.norm(theta[0:3]))
    if angle >= 1e-4:
        axis = theta[0:3] / angle
        skew = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        positions = positions @ (np.eye(3) + math.sin(angle) * skew + (1 - math.cos(angle)) * skew @ skew).T
    positions = positions + theta[3:6]
    corr = np.asarray(corr, dtype=int)
    if len(us) == 0:
        hand = positions[corr]
    else:
        u, tri = np.asarray(us), np.asarray(model["triangles"])[corr]
        hand = (
            sum(u[:, k : k + 1] * positions[tri[:, k]] for k in range(2))
            + (1 - u[:, 0:1] - u[:, 1:2]) * positions[tri[:, 2]]
        )
    return (np.asarray(points) - hand).ravel()


def _rigid(rng: np.random.Generator) -> list[list[float]]:
    transform = np.eye(4)
    transform[:3, :3] = _ht_rotation(0, rng.normal()) @ _ht_rotation(2, rng.normal())
    transform[:3, 3] = rng.normal(size=3)
    return transform.tolist()


def _ht_input(rng: np.random.Generator, complicated: bool, mirrored: bool, n: int = 5) -> dict[str, Any]:
    # the hand's tree: wrist, five fingers of four bones, forearm
    parents = [-1] + [p for f in range(5) for p in (0, 1 + 4 * f, 2 + 4 * f, 3 + 4 * f)] + [0]
    bones, vertices = len(parents), 9
    weights = rng.uniform(size=(vertices, bones)) * (rng.uniform(size=(vertices, bones)) < 0.3)
    weights[:, 0] += 0.1
    weights /= weights.sum(axis=1, keepdims=True)
    base = np.concatenate([rng.normal(size=(vertices, 3)), np.ones((vertices, 1))], axis=1)
    triangles = rng.integers(0, vertices, size=(6, 3))
    model = {
        "bone_count": bones, "bone_names": [f"b{i}" for i in range(bones)], "parents": parents,
        "base_relatives": [_rigid(rng) for _ in range(bones)],
        "inverse_base_absolutes": [_rigid(rng) for _ in range(bones)],
        "base_positions": base.tolist(), "weights": weights.tolist(),
        "triangles": triangles.tolist(), "is_mirrored": mirrored,
    }  # fmt: skip
    targets = triangles.shape[0] if complicated else vertices
    return {
        "theta": (0.3 * rng.normal(size=26)).tolist(),
        "data": {
            "model": model,
            "correspondences": rng.integers(0, targets, size=n).tolist(),
            "points": rng.normal(size=(n, 3)).tolist(),
        },
        "us": rng.uniform(0, 0.5, size=(n, 2)).tolist() if complicated else [],
    }


def _ht_jacobian_fd(input: dict[str, Any]) -> np.ndarray:
    """Columns d/du_i0, d/du_i1 (complicated), then d/dtheta, by central differences. A point's
    residuals depend only on its own us, so moving every point's us[:, k] at once gives column k."""
    theta, us = np.asarray(input["theta"]), np.asarray(input["us"])
    model, corr, points = input["data"]["model"], input["data"]["correspondences"], input["data"]["points"]

    def at(theta: np.ndarray, us: np.ndarray) -> np.ndarray:
        return _ht_residuals(theta, model, corr, points, us)

    columns = []
    for k in range(2 if us.size else 0):
        step = np.zeros_like(us)
        step[:, k] = STEP
        columns.append((at(theta, us + step) - at(theta, us - step)) / (2 * STEP))
    for k in range(26):
        step = np.zeros(26)
        step[k] = STEP
        columns.append((at(theta + step, us) - at(theta - step, us)) / (2 * STEP))
    return np.stack(columns, axis=1)


@pytest.mark.parametrize(
    "complicated, mirrored, still",
    [(True, False, False), (False, True, False), (True, False, True)],
    ids=["complicated", "simple-mirrored", "no-global-rotation"],
)
def test_ht_against_the_definition(
    client: Client, monkeypatch: pytest.MonkeyPatch, complicated: bool, mirrored: bool, still: bool
) -> None:
    input = _ht_input(np.random.default_rng(11), complicated, mirrored)
    if still:  # a global rotation below 1e-4 is none at all (the eval's branch), derivative included
        input["theta"][0:3] = [0.0, 0.0, 0.0]
    monkeypatch.setattr(ht, "CHUNK", 3)  # two requests, the second partial: chunks must line up
    theta = np.asarray(input["theta"])
    data = input["data"]
    expected = _ht_residuals(theta, data["model"], data["correspondences"], data["points"], input["us"])
    objective = ht.FUNCTIONS["objective"](client, input)
    assert_gradbench_close(objective, expected, "objective")
    jacobian = np.asarray(ht.FUNCTIONS["jacobian"](client, input))
    assert jacobian.shape == (15, 28 if complicated else 26)
    assert_gradbench_close(jacobian, _ht_jacobian_fd(input), "jacobian")
    # a wrong pose table or bone chain would still pass a loose check if theta barely moved the
    # hand: every column of theta must matter here (but the rotation's, where it is none)
    moved = np.abs(jacobian[:, -26:]).max(axis=0) > 1e-3
    assert list(moved) == [not still] * 3 + [True] * 23


def test_ht_pose_table_uses_each_parameter_once() -> None:
    slots = ht.pose_slots(22).reshape(25, 3)
    used = sorted(int(s) for s in slots.ravel() if s < 26)
    assert used == list(range(26))
    assert list(slots[1]) == [27, 27, 27]  # the scale row is ones


def test_the_tool_answers_gradbench_messages(client: Client) -> None:
    # GradBench's protocol: one JSON message per line, one answer per line with the same id
    input = _ht_input(np.random.default_rng(2), complicated=False, mirrored=False, n=2)
    messages = [
        {"id": 0, "kind": "start", "eval": "ht"},
        {"id": 1, "kind": "define", "module": "ht"},
        {
            "id": 2,
            "kind": "evaluate",
            "module": "ht",
            "function": "objective",
            "input": input | {"min_runs": 2},
        },
        {"id": 3, "kind": "define", "module": "nothing"},
        {"id": 4, "kind": "evaluate", "module": "ht", "function": "hessian", "input": input},
    ]
    out = io.StringIO()
    tool.serve(client, [json.dumps(m) + "\n" for m in messages], out)
    answers = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [a["id"] for a in answers] == [0, 1, 2, 3, 4]
    assert answers[1]["success"] is True and answers[3]["success"] is False
    theta, data = np.asarray(input["theta"]), input["data"]
    expected = _ht_residuals(theta, data["model"], data["correspondences"], data["points"], [])
    assert answers[2]["success"] is True
    assert_gradbench_close(answers[2]["output"], expected, "objective through the tool")
    assert [t["name"] for t in answers[2]["timings"]] == ["evaluate", "evaluate"]
    assert answers[4]["success"] is False and "hessian" in answers[4]["error"]
