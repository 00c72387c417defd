"""Run the examples at GradBench's default sizes against a server: pass/fail and cold/warm times.

    python -m examples.gradbench.measure --url http://127.0.0.1:8000 --ba-data ~/gradbench/evals/ba/data \
        --ht-data ~/gradbench/evals/ht/data

Inputs are generated as GradBench's evals generate them (same sizes, seeds and generators). Each
answer is checked with GradBench's rule, |x - y| / max(1, |x| + |y|) <= 1e-4, against float64 numpy
written here: closed forms where they exist (lse, llsq, det, kmeans), the objective and central
differences at sampled coordinates (gmm, ba), or at every column (ht's 28). "cold" is the first
request of a size (the service compiles the program), "warm" the median of the next ``--warm``
requests; both are full round trips.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from examples.gradbench import ba, det, gmm, hello, ht, kmeans, llsq, lse, lstm, ode, particle, saddle
from service.client import Client

TOLERANCE = 1e-4
STEP = 1e-6  # central differences in float64


def gradbench_error(actual: Any, expected: Any) -> float:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != e.shape:
        return math.inf
    return float(np.max(np.abs(a - e) / np.maximum(1.0, np.abs(a) + np.abs(e)), initial=0.0))


def timed(
    client: Client, fn: Callable[[Client, Any], Any], input: Any, warm: int
) -> tuple[Any, float, float]:
    begin = time.perf_counter()
    output = fn(client, input)
    cold = time.perf_counter() - begin
    times = []
    for _ in range(warm):
        begin = time.perf_counter()
        fn(client, input)
        times.append(time.perf_counter() - begin)
    return output, cold, statistics.median(times) if times else math.nan


# -- inputs as GradBench generates them, with numpy references -----------------------------------


Case = tuple[str, str, Any, Callable[[Any], float]]  # function, description, input, error of an output


def hello_cases() -> Iterator[Case]:
    yield "square", "x=1.5", 1.5, lambda out: gradbench_error(out, 2.25)
    yield "double", "x=2.25", 2.25, lambda out: gradbench_error(out, 4.5)


def lse_cases() -> Iterator[Case]:
    np.random.seed(31337)
    for n in [2500 * 2**i for i in range(10)]:
        x = np.random.rand(n)
        value = x.max() + math.log(np.sum(np.exp(x - x.max())))
        input = {"x": x.tolist()}
        yield "primal", f"n={n}", input, lambda out, v=value: gradbench_error(out, v)
        yield "gradient", f"n={n}", input, lambda out, x=x, v=value: gradbench_error(out, np.exp(x - v))


def llsq_cases() -> Iterator[Case]:
    np.random.seed(31337)
    for n in [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8196, 16392]:
        x = np.random.rand(128)
        t = -1 + np.arange(n) * 2 / (n - 1)
        vander = np.vander(t, 128, increasing=True)
        residual = np.sign(t) - vander @ x
        input = {"x": x.tolist(), "n": n}
        yield "primal", f"n={n},m=128", input, lambda out, r=residual: gradbench_error(out, 0.5 * r @ r)
        yield "gradient", f"n={n},m=128", input, lambda out, g=-vander.T @ residual: gradbench_error(out, g)


def det_cases() -> Iterator[Case]:
    np.random.seed(31337)
    for ell in range(5, 12):
        a = np.random.rand(ell * ell).reshape(ell, ell)
        d = np.linalg.det(a)
        input = {"A": a.ravel().tolist(), "ell": ell}
        yield "primal", f"ell={ell}", input, lambda out, d=d: gradbench_error(out, d)
        cofactors = (d * np.linalg.inv(a).T).ravel()
        yield "gradient", f"ell={ell}", input, lambda out, c=cofactors: gradbench_error(out, c)


def kmeans_cases() -> Iterator[Case]:
    np.random.seed(31337)
    sizes = sorted([(k, n, d) for k in [10, 100, 1000] for n in [1000, 10000] for d in [8, 16]],
                   key=lambda v: v[0] * v[1] * v[2])  # fmt: skip
    for k, n, d in sizes:
        points = np.random.rand(n, d)
        centroids = points[-k:]
        distances = (points**2).sum(1)[:, None] - 2 * points @ centroids.T + (centroids**2).sum(1)[None, :]
        nearest = np.argmin(distances, axis=1)
        cost = float(np.sum(distances[np.arange(n), nearest]))
        counts = np.bincount(nearest, minlength=k)[:, None]
        sums = np.zeros((k, d))
        np.add.at(sums, nearest, points)
        direction = centroids - sums / counts  # J / diag(H) = (2 |j| C_j - 2 sum P) / (2 |j|)
        input = {"points": points.tolist(), "centroids": centroids.tolist()}
        yield "cost", f"k={k},n={n},d={d}", input, lambda out, c=cost: gradbench_error(out, c)
        yield "dir", f"k={k},n={n},d={d}", input, lambda out, r=direction: gradbench_error(out, r)


def _gmm_objective(p: dict[str, Any], alpha: Any, mu: Any, q: Any, lower: Any) -> float:
    d, k, n, m, gamma = p["d"], p["k"], p["n"], p["m"], p["gamma"]
    x = np.asarray(p["x"])
    qmat = np.zeros((k, d, d))
    qmat[:, np.arange(d), np.arange(d)] = np.exp(q)
    rows, cols = np.tril_indices(d, -1)
    order = np.lexsort((rows, cols))  # column by column
    qmat[:, rows[order], cols[order]] = lower
    centered = x[:, None, :] - mu[None, :, :]
    mahalanobis = np.einsum("kij,nkj->nki", qmat, centered)
    beta = alpha[None, :] + q.sum(1)[None, :] - 0.5 * (mahalanobis**2).sum(2)
    top = beta.max(1, keepdims=True)
    lse_rows = top[:, 0] + np.log(np.exp(beta - top).sum(1))
    lse_alpha = alpha.max() + math.log(np.exp(alpha - alpha.max()).sum())
    dof = d + m + 1
    log_gamma_d = d * (d - 1) / 4 * math.log(math.pi) + sum(
        math.lgamma(dof / 2 + (1 - j) / 2) for j in range(1, d + 1)
    )
    prior = k * (dof * d * math.log(gamma / math.sqrt(2)) - log_gamma_d) - 0.5 * gamma**2 * (
        np.sum(np.exp(q) ** 2) + np.sum(lower**2)
    ) + m * np.sum(q)  # fmt: skip
    return float(-n * (d / 2 * math.log(2 * math.pi) + lse_alpha) + lse_rows.sum() + prior)


def gmm_cases() -> Iterator[Case]:
    sizes = sorted(
        [(d, k) for d in [2, 10, 20, 32, 64] for k in [5, 10, 25, 50, 100]], key=lambda v: v[0] * v[1]
    )
    for d, k in sizes:
        rng = np.random.default_rng(seed=31337)
        input = {
            "d": d, "k": k, "n": 1000,
            "x": [list(rng.normal(size=d)) for _ in range(1000)],
            "m": 0, "gamma": 1.0,
            "alpha": list(rng.normal(size=k)),
            "mu": [list(rng.uniform(size=d)) for _ in range(k)],
            "q": [list(rng.normal(size=d)) for _ in range(k)],
            "l": [list(rng.normal(size=d * (d - 1) // 2)) for _ in range(k)],
        }  # fmt: skip
        params = {name: np.asarray(input[name], np.float64).reshape(shape) for name, shape in
                  [("alpha", (k,)), ("mu", (k, d)), ("q", (k, d)), ("l", (k, d * (d - 1) // 2))]}  # fmt: skip
        value = _gmm_objective(input, *params.values())
        yield "objective", f"d={d},k={k},n=1000", input, lambda out, v=value: gradbench_error(out, v)

        def check(out: Any, params: dict[str, np.ndarray] = params, input: dict[str, Any] = input) -> float:
            worst, sample = 0.0, np.random.default_rng(0)
            for name, array in params.items():
                got = np.asarray(out[name], np.float64).reshape(array.shape)
                for _ in range(6):  # a 5-point stencil at six sampled coordinates per variable
                    index = tuple(int(sample.integers(0, s)) for s in array.shape)

                    def at(delta: float, name: str = name, index: tuple[int, ...] = index) -> float:
                        moved = params[name].copy()
                        moved[index] += delta
                        return _gmm_objective(input, *(params | {name: moved}).values())

                    # the objective reaches ~1e5: h = 1e-3 keeps its rounding (|f| 1e-16 / h) near 1e-8,
                    # and the stencil's truncation (h**4) below that
                    h = 1e-3
                    fd = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)
                    worst = max(worst, gradbench_error(got[index], fd))
            return worst

        yield "jacobian", f"d={d},k={k},n=1000", input, check


def _ba_residuals(cam: np.ndarray, X: np.ndarray, w: float, feat: np.ndarray) -> np.ndarray:
    theta = np.linalg.norm(cam[0:3])
    axis = cam[0:3] / theta
    skew = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotated = (np.eye(3) + math.sin(theta) * skew + (1 - math.cos(theta)) * skew @ skew) @ (X - cam[3:6])
    proj = rotated[:2] / rotated[2]
    r2 = proj @ proj
    projected = proj * (1 + cam[9] * r2 + cam[10] * r2 * r2) * cam[6] + cam[7:9]
    return np.concatenate([w * (projected - feat), [1 - w * w]])


def _ba_blocks(cam: np.ndarray, X: np.ndarray, w: float, feat: np.ndarray) -> list[np.ndarray]:
    """Central differences of one observation's residuals by camera (3, 11), point (3, 3), weight (3, 1)."""
    functions: list[tuple[Callable[[np.ndarray], np.ndarray], np.ndarray]] = [
        (lambda v: _ba_residuals(v, X, w, feat), cam),
        (lambda v: _ba_residuals(cam, v, w, feat), X),
        (lambda v: _ba_residuals(cam, X, float(v[0]), feat), np.array([w])),
    ]
    blocks = []
    for fn, at in functions:
        cols = []
        for j in range(at.size):
            up, down = at.copy(), at.copy()
            up[j] += STEP
            down[j] -= STEP
            cols.append((fn(up) - fn(down)) / (2 * STEP))
        blocks.append(np.stack(cols, axis=1))
    return blocks


def ba_cases(data: Path | None) -> Iterator[Case]:
    if data is None:
        return
    for i in range(1, 15):
        path = next(data.glob(f"ba{i}_*.txt"), None)
        if path is None:
            continue
        lines = path.read_text().splitlines()
        n, m, p = (int(v) for v in lines[0].split())
        cam, X = np.array(lines[1].split(), float), np.array(lines[2].split(), float)
        w, feat = float(lines[3]), np.array(lines[4].split(), float)
        input = {"n": n, "m": m, "p": p, "cam": cam.tolist(), "x": X.tolist(), "w": w, "feat": feat.tolist()}
        r = _ba_residuals(cam, X, w, feat)
        yield (
            "objective",
            path.stem,
            input,
            lambda out, r=r: max(
                gradbench_error(out["reproj_error"]["elements"], r[:2]),
                gradbench_error(out["w_err"]["element"], r[2]),
            ),
        )
        # every observation is the same: the first two rows are observation 0's block, the last
        # entry d w_err / dw of the last weight
        blocks = _ba_blocks(cam, X, w, feat)
        rows = np.concatenate([np.concatenate([b[i] for b in blocks]) for i in range(2)])
        yield (
            "jacobian",
            path.stem,
            input,
            lambda out, rows=rows, w=w: max(
                gradbench_error(out["vals"][:30], rows), gradbench_error(out["vals"][-1], -2 * w)
            ),
        )


def _ode(x: np.ndarray, s: int) -> np.ndarray:
    y, h = np.zeros_like(x), 2 / s

    def slope(y: np.ndarray) -> np.ndarray:
        return np.concatenate([x[:1], x[1:] * y[:-1]])

    for _ in range(s):
        k1 = slope(y)
        k2 = slope(y + h * k1 / 2)
        k3 = slope(y + h * k2 / 2)
        y = y + h * (k1 + 2 * k2 + 2 * k3 + slope(y + h * k3)) / 6
    return y


def _sampled_gradient_error(
    out: Any, fn: Callable[[np.ndarray], float], x: np.ndarray, count: int = 6
) -> float:
    """GradBench's error of ``out`` (flat) at ``count`` sampled coordinates, by central differences."""
    got, worst, sample = np.asarray(out, np.float64).ravel(), 0.0, np.random.default_rng(0)
    for index in sample.choice(x.size, size=min(count, x.size), replace=False):
        up, down = x.ravel().copy(), x.ravel().copy()
        up[index] += STEP
        down[index] -= STEP
        fd = (fn(up.reshape(x.shape)) - fn(down.reshape(x.shape))) / (2 * STEP)
        worst = max(worst, gradbench_error(got[index], fd))
    return worst


def ode_cases() -> Iterator[Case]:
    np.random.seed(31337)
    for n, s in sorted(
        [(n, s) for n in [1000, 10000, 100000] for s in [1, 10, 100]], key=lambda v: v[0] * v[1]
    ):
        x = np.random.rand(n)
        input = {"x": x.tolist(), "s": s}
        y = _ode(x, s)
        yield "primal", f"n={n},s={s}", input, lambda out, y=y: gradbench_error(out, y)
        yield (
            "gradient",
            f"n={n},s={s}",
            input,
            lambda out, x=x, s=s: _sampled_gradient_error(out, lambda v: float(_ode(v, s)[-1]), x),
        )


def _lstm_loss(main: np.ndarray, extra: np.ndarray, state: np.ndarray, sequence: np.ndarray) -> float:
    layers, b = main.shape[0] // 2, main.shape[1] // 4
    hidden, cell = state[0::2].copy(), state[1::2].copy()
    total = 0.0
    for t in range(sequence.shape[0] - 1):
        value = sequence[t] * extra[0]
        for i in range(layers):
            weight, bias = main[2 * i].reshape(4, b), main[2 * i + 1].reshape(4, b)
            cell[i] = cell[i] / (1 + np.exp(-(value * weight[0] + bias[0]))) + np.tanh(
                hidden[i] * weight[3] + bias[3]
            ) / (1 + np.exp(-(hidden[i] * weight[1] + bias[1])))
            hidden[i] = np.tanh(cell[i]) / (1 + np.exp(-(value * weight[2] + bias[2])))
            value = hidden[i]
        prediction = value * extra[1] + extra[2]
        total += float(sequence[t + 1] @ (prediction - math.log(np.sum(np.exp(prediction)) + 2)))
    return -total / ((sequence.shape[0] - 1) * b)


def lstm_cases(text_path: Path | None) -> Iterator[Case]:
    # GradBench reads evals/lstm/data/lstm_full.txt; any text of the length gives the same shapes
    text = text_path.read_text(encoding="utf8") if text_path else Path(__file__).read_text() * 40
    for layers, c in sorted(
        [(la, c) for la in [2, 4, 6] for c in [1024, 4096, 8192]], key=lambda v: v[0] * v[1]
    ):
        used = text[:c]
        bits = math.ceil(math.log2(max(ord(ch) for ch in used)))
        sequence = np.array([[float(d) for d in bin(ord(ch))[2:].zfill(bits)] for ch in used])
        state = np.random.random((2 * layers, bits))
        main = np.random.random((2 * layers, bits * 4))
        extra = np.random.random((3, bits))
        input = {"main_params": main.tolist(), "extra_params": extra.tolist(), "state": state.tolist(),
                 "sequence": sequence.tolist()}  # fmt: skip
        value = _lstm_loss(main, extra, state, sequence)
        yield "objective", f"l={layers},c={c}", input, lambda out, v=value: gradbench_error(out, v)

        def check(out: Any, main: np.ndarray = main, extra: np.ndarray = extra, state: np.ndarray = state,
                  sequence: np.ndarray = sequence) -> float:  # fmt: skip
            got = np.asarray(out, np.float64)
            return max(
                _sampled_gradient_error(
                    got[: main.size], lambda v: _lstm_loss(v, extra, state, sequence), main
                ),
                _sampled_gradient_error(
                    got[main.size :], lambda v: _lstm_loss(main, v, state, sequence), extra
                ),
            )

        yield "jacobian", f"l={layers},c={c}", input, check


def _ht_model(directory: Path) -> dict[str, Any]:
    """GradBench's hand model (``model/`` of a data directory) in the eval's JSON form."""

    def rows(name: str) -> list[list[str]]:
        return [line.split(":") for line in (directory / name).read_text().splitlines() if line.strip()]

    bones, vertices = rows("bones.txt"), rows("vertices.txt")
    weights = np.zeros((len(vertices), len(bones)))
    for i, atoms in enumerate(vertices):
        for k in range(int(atoms[8])):  # atoms 9.. are (bone, weight) pairs
            weights[i, int(atoms[9 + 2 * k])] = float(atoms[10 + 2 * k])
    positions = np.ones((len(vertices), 4))
    positions[:, :3] = [[float(v) for v in atoms[:3]] for atoms in vertices]
    return {
        "bone_count": len(bones), "bone_names": [atoms[0] for atoms in bones],
        "parents": [int(atoms[1]) for atoms in bones],
        "base_relatives": [np.array(atoms[2:18], float).reshape(4, 4).tolist() for atoms in bones],
        "inverse_base_absolutes": [np.array(atoms[18:34], float).reshape(4, 4).tolist() for atoms in bones],
        "base_positions": positions.tolist(), "weights": weights.tolist(),
        "triangles": [[int(v) for v in atoms] for atoms in rows("triangles.txt")], "is_mirrored": False,
    }  # fmt: skip


def _ht_instance(model: dict[str, Any], path: Path, complicated: bool) -> dict[str, Any]:
    lines = path.read_text().splitlines()
    n, count = (int(v) for v in lines[0].split())
    points = [line.split() for line in lines[1 : 1 + n]]
    us = [[float(v) for v in line.split()] for line in lines[1 + n : 1 + 2 * n]] if complicated else []
    start = 1 + (2 if complicated else 1) * n
    return {
        "theta": [float(lines[start + i]) for i in range(count)],
        "data": {"model": model, "correspondences": [int(p[0]) for p in points],
                 "points": [[float(v) for v in p[1:]] for p in points]},
        "us": us,
    }  # fmt: skip


def _ht_residuals(theta: np.ndarray, model: dict[str, Any], corr: np.ndarray, points: np.ndarray,
                  us: np.ndarray) -> np.ndarray:  # fmt: skip
    parents, slots = model["parents"], ht.pose_slots(len(model["parents"]))
    pose = np.concatenate([theta, [0.0, 1.0]])[slots].reshape(-1, 3)

    def turn(i: int, j: int, t: float) -> np.ndarray:
        r = np.eye(3)
        r[i, i] = r[j, j] = math.cos(t)
        r[i, j], r[j, i] = -math.sin(t), math.sin(t)
        return r

    absolutes: list[np.ndarray] = []
    for b, (tx, tz, ty) in enumerate(pose[3:]):
        posed = np.eye(4)
        posed[:3, :3] = turn(0, 1, tz) @ turn(2, 0, ty) @ turn(1, 2, tx)
        relative = model["base_relatives"][b] @ posed
        absolutes.append(relative if parents[b] < 0 else absolutes[parents[b]] @ relative)
    transforms = np.stack(absolutes) @ model["inverse_base_absolutes"]
    positions = np.einsum("vb,brk,vk->vr", model["weights"], transforms[:, :3], model["base_positions"])
    if model["is_mirrored"]:
        positions[:, 0] *= -1
    angle = float(np.linalg.norm(theta[:3]))
    if angle >= 1e-4:
        k = theta[:3] / angle
        skew = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        positions = positions @ (np.eye(3) + math.sin(angle) * skew + (1 - math.cos(angle)) * skew @ skew).T
    positions = positions + theta[3:6]
    if us.size == 0:
        return (points - positions[corr]).ravel()
    tri = model["triangles"][corr]
    hand = us[:, :1] * positions[tri[:, 0]] + us[:, 1:] * positions[tri[:, 1]]
    return (points - hand - (1 - us[:, :1] - us[:, 1:]) * positions[tri[:, 2]]).ravel()


def ht_cases(data: Path | None, variant: str = "complicated_big") -> Iterator[Case]:
    """GradBench's default: the complicated variant on the big model, hands 1..12. Where a hand
    file is absent or empty (hand12, 100,000 points, is a large file), the largest one present is
    repeated up to its point count."""
    if data is None:
        return
    directory, complicated = data / variant, variant.startswith("complicated")
    model = _ht_model(directory / "model")
    arrays = {key: np.asarray(model[key], dtype=np.int64 if key in ("triangles",) else np.float64)
              for key in ("base_relatives", "inverse_base_absolutes", "weights", "base_positions",
                          "triangles")} | {"parents": model["parents"], "is_mirrored": False}  # fmt: skip
    largest: dict[str, Any] | None = None
    for i in range(1, 13):
        path = next(directory.glob(f"hand{i}_*.txt"), None)
        if path is None:
            continue
        wanted = int(path.stem.rsplit("_c", 1)[1])
        if path.stat().st_size > 0:
            input = largest = _ht_instance(model, path, complicated)
        elif largest is not None:
            have = len(largest["data"]["correspondences"])
            index = np.arange(wanted) % have
            data_part = {
                key: np.asarray(largest["data"][key])[index].tolist() for key in ("correspondences", "points")
            }
            us = np.asarray(largest["us"])[index].tolist() if complicated else []
            input = {"theta": largest["theta"], "data": {"model": model, **data_part}, "us": us}
        else:
            continue
        theta, us = np.asarray(input["theta"]), np.asarray(input["us"], np.float64).reshape(-1, 2)
        corr, points = np.asarray(input["data"]["correspondences"]), np.asarray(input["data"]["points"])
        residuals = _ht_residuals(theta, arrays, corr, points, us if complicated else np.empty(0))
        yield "objective", path.stem, input, lambda out, r=residuals: gradbench_error(out, r)

        def check(out: Any, theta: np.ndarray = theta, us: np.ndarray = us, corr: np.ndarray = corr,
                  points: np.ndarray = points) -> float:  # fmt: skip
            # every column by central differences; a point's residuals depend only on its own us,
            # so moving all of us[:, k] at once gives the k-th column of every 3 x 2 block
            columns = []
            for k in range(2 if complicated else 0):
                step = np.zeros_like(us)
                step[:, k] = STEP
                up, down = (_ht_residuals(theta, arrays, corr, points, us + s * step) for s in (1, -1))
                columns.append((up - down) / (2 * STEP))
            for k in range(ht.THETA):
                step = np.zeros(ht.THETA)
                step[k] = STEP
                up, down = (_ht_residuals(theta + s * step, arrays, corr, points, us if complicated else
                                          np.empty(0)) for s in (1, -1))  # fmt: skip
                columns.append((up - down) / (2 * STEP))
            return gradbench_error(out, np.stack(columns, axis=1))

        yield "jacobian", path.stem, input, check


def saddle_cases() -> Iterator[Case]:
    # GradBench's eval checks every variant against this answer from (1, 1)
    for function in ("rr", "ff", "fr", "rf"):
        yield (
            function,
            "start=(1,1)",
            {"start": [1.0, 1.0]},
            lambda out: gradbench_error(out, [8.246324826140356e-06] * 4),
        )


def particle_cases() -> Iterator[Case]:
    # GradBench's eval checks every variant against this answer from w = 0
    for function in ("rr", "ff", "fr", "rf"):
        yield function, "w=0", {"w": 0.0}, lambda out: gradbench_error(out, 0.2071918746486116)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=None)
    parser.add_argument(
        "--evals",
        nargs="+",
        default=[
            "hello",
            "lse",
            "llsq",
            "det",
            "kmeans",
            "gmm",
            "ba",
            "ht",
            "ode",
            "lstm",
            "saddle",
            "particle",
        ],
    )
    parser.add_argument("--ba-data", type=Path, default=None, help="GradBench's evals/ba/data")
    parser.add_argument("--ht-data", type=Path, default=None, help="GradBench's evals/ht/data")
    parser.add_argument(
        "--lstm-text", type=Path, default=None, help="GradBench's evals/lstm/data/lstm_full.txt"
    )
    parser.add_argument("--warm", type=int, default=2)
    args = parser.parse_args()
    sources: dict[str, tuple[Any, Callable[[], Iterator[Case]]]] = {
        "hello": (hello, hello_cases), "lse": (lse, lse_cases), "llsq": (llsq, llsq_cases),
        "det": (det, det_cases), "kmeans": (kmeans, kmeans_cases), "gmm": (gmm, gmm_cases),
        "ba": (ba, lambda: ba_cases(args.ba_data)), "ht": (ht, lambda: ht_cases(args.ht_data)),
        "ode": (ode, ode_cases), "lstm": (lstm, lambda: lstm_cases(args.lstm_text)),
        "saddle": (saddle, saddle_cases), "particle": (particle, particle_cases),
    }  # fmt: skip
    with Client(args.url, timeout=600, encoding="base64") as client:  # as tool.py
        for name in args.evals:
            module, cases = sources[name]
            for function, description, input, error_of in cases():
                try:
                    output, cold, warm = timed(client, module.FUNCTIONS[function], input, args.warm)
                    error = error_of(output)
                    verdict = "pass" if error <= TOLERANCE else "FAIL"
                    print(f"{name:7s} {function:9s} {description:28s} {verdict} err {error:.1e} "
                          f"cold {cold * 1000:9.1f} ms warm {warm * 1000:9.1f} ms", flush=True)  # fmt: skip
                except Exception as exc:  # report and go on: one size's failure is a result too
                    print(
                        f"{name:7s} {function:9s} {description:28s} ERROR {type(exc).__name__}: {exc}"[:300],
                        flush=True,
                    )


if __name__ == "__main__":
    main()
