"""ba: bundle adjustment's reprojection and weight errors, and their sparse Jacobian.

GradBench sends one camera, point, weight and feature with counts n, m, p: the tool builds n
cameras, m points, p weights and features, and observation j pairs camera j mod n with point
j mod m (the duplication must not be exploited, so every observation is computed). The objective
gathers each observation's camera and point in the service. The Jacobian is per observation (a
2 x 15 block of the reprojection error and d w_err / dw): a batched request (``batch``) over
observations returns every block at once, and the client lays the blocks out as GradBench's
compressed-row matrix. Requests go in chunks of ``CHUNK`` observations, within the per-request
limits however large p is.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from examples.gradbench import DTYPE, Evaluate
from service.client import Client

CAMERA_PARAMS = 11  # rotation (3), center (3), focal length, principal point (2), radial distortion (2)
# Observations per request: 65,536 x 11 camera parameters fit the per-tensor and batch limits.
CHUNK = 65_536

# Rodrigues' rotation of X by the axis-angle vector rot, and at angle 0 its first-order form. The
# angle comes from a safe square (1 where it is 0), so the branch not taken never makes a NaN that
# its zero gradient would multiply.
FUNCTIONS_TEXT: dict[str, dict[str, Any]] = {
    "squared_norm": {"params": ["v"], "body": "sum(v * v, axis=-1, keepdims=True)"},
    "angle": {"params": ["rot"], "body": "sqrt(where(squared_norm(rot) > 0, squared_norm(rot), 1.0))"},
    "rodrigues": {
        "params": ["axis", "X", "theta"],
        "body": "X * cos(theta) + cross(axis, X) * sin(theta)"
        " + axis * sum(axis * X, axis=-1, keepdims=True) * (1 - cos(theta))",
    },
    "rotate": {
        "params": ["rot", "X"],
        "body": "where(squared_norm(rot) > 0, rodrigues(rot / angle(rot), X, angle(rot)), X + cross(rot, X))",
    },
    "distort": {
        "params": ["rad", "proj"],
        "body": "proj * (1 + rad[..., 0:1] * sum(proj * proj, axis=-1, keepdims=True)"
        " + rad[..., 1:2] * sum(proj * proj, axis=-1, keepdims=True) ** 2)",
    },
    "project": {
        "params": ["cam", "X"],
        "body": "distort(cam[..., 9:11], rotate(cam[..., 0:3], X - cam[..., 3:6])[..., 0:2]"
        " / rotate(cam[..., 0:3], X - cam[..., 3:6])[..., 2:3]) * cam[..., 6:7] + cam[..., 7:9]",
    },
    "reprojection_error": {
        "params": ["cam", "X", "w", "feat"],
        "body": "w[..., None] * (project(cam, X) - feat)",
    },
}

# The objective over observations: 2 reprojection errors each, then every weight's error.
OBJECTIVE = (
    "concatenate([reshape(reprojection_error(gather(cams, obs[:, 0]), gather(X, obs[:, 1]), w, feat), (-1,)),"
    " 1 - w * w])"
)
# One observation (batched over observations): its 2 reprojection errors and its weight's error.
BLOCK = "concatenate([reprojection_error(cam, X, w, feat), reshape(1 - w * w, (1,))])"


def build(input: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The full problem from GradBench's one-of-each input: cams, X, w, feats and obs (indices)."""
    n, m, p = int(input["n"]), int(input["m"]), int(input["p"])
    rows = np.arange(p)
    return {
        "cams": np.tile(np.asarray(input["cam"], dtype=np.float64), (n, 1)),
        "X": np.tile(np.asarray(input["x"], dtype=np.float64), (m, 1)),
        "w": np.full(p, float(input["w"])),
        "feats": np.tile(np.asarray(input["feat"], dtype=np.float64), (p, 1)),
        "obs": np.stack([rows % n, rows % m], axis=1).astype(np.float64),
    }


def _chunks(p: int) -> Iterator[slice]:
    for start in range(0, p, CHUNK):
        yield slice(start, min(start + CHUNK, p))


def errors(client: Client, problem: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Reprojection errors (p, 2) and weight errors (p,), computed in the service."""
    p = problem["w"].size
    reproj, w_err = np.empty((p, 2)), np.empty(p)
    for part in _chunks(p):
        result = client.compute(
            OBJECTIVE,
            {"w": problem["w"][part]},
            constants={
                "cams": problem["cams"],
                "X": problem["X"],
                "feat": problem["feats"][part],
                "obs": problem["obs"][part],
            },
            functions=FUNCTIONS_TEXT,
            derivatives=(),
            dtype=DTYPE,
        )
        value = np.asarray(result.value)
        count = part.stop - part.start
        reproj[part] = value[: 2 * count].reshape(count, 2)
        w_err[part] = value[2 * count :]
    return reproj, w_err


def blocks(client: Client, problem: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per observation, d(reproj_err, w_err)/d(camera, point, weight): (p, 3, 11), (p, 3, 3), (p, 3)."""
    obs = problem["obs"].astype(np.int64)
    p = obs.shape[0]
    out = {"cam": np.empty((p, 3, CAMERA_PARAMS)), "X": np.empty((p, 3, 3)), "w": np.empty((p, 3))}
    for part in _chunks(p):
        # every request has min(CHUNK, p) rows (the last padded with repeats of its first observation,
        # whose blocks are dropped), so one compiled program serves every chunk of every large problem
        rows = np.arange(part.start, part.start + min(CHUNK, p))
        rows[rows >= p] = part.start
        jacobian = client.jacobian(
            BLOCK,
            {
                # the observation's own camera and point: a copy, as any batched Jacobian needs
                "cam": problem["cams"][obs[rows, 0]],
                "X": problem["X"][obs[rows, 1]],
                "w": problem["w"][rows],
                "feat": problem["feats"][rows],
            },
            wrt=("cam", "X", "w"),
            functions=FUNCTIONS_TEXT,
            batch=True,
            dtype=DTYPE,
        )
        count = part.stop - part.start
        for name in out:
            out[name][part] = jacobian[name][:count]
    return out


def sparse_jacobian(
    problem: Mapping[str, np.ndarray], block: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """GradBench's compressed rows: 2 rows of 15 entries per observation, then one per weight."""
    obs = problem["obs"].astype(np.int64)
    p, n, m = obs.shape[0], problem["cams"].shape[0], problem["X"].shape[0]
    j = np.arange(p)
    cam_cols = CAMERA_PARAMS * obs[:, 0, None] + np.arange(CAMERA_PARAMS)
    point_cols = CAMERA_PARAMS * n + 3 * obs[:, 1, None] + np.arange(3)
    weight_cols = (CAMERA_PARAMS * n + 3 * m + j)[:, None]
    cols_one_row = np.concatenate([cam_cols, point_cols, weight_cols], axis=1)  # (p, 15)
    reproj_cols = np.repeat(cols_one_row[:, None, :], 2, axis=1)  # (p, 2, 15)
    reproj_vals = np.concatenate([block["cam"][:, :2], block["X"][:, :2], block["w"][:, :2, None]], axis=2)
    cols = np.concatenate([reproj_cols.ravel(), weight_cols.ravel()])
    vals = np.concatenate([reproj_vals.ravel(), block["w"][:, 2]])
    row_lengths = np.concatenate([np.full(2 * p, 15), np.ones(p, dtype=np.int64)])
    rows = np.concatenate([[0], np.cumsum(row_lengths)])
    return {"rows": rows, "cols": cols, "vals": vals}


def _excerpt(values: np.ndarray) -> list[Any]:
    # GradBench compares the first 30 entries and the last of each list
    return [*values[:30].tolist(), values[-1].item()]


def objective(client: Client, input: Mapping[str, Any]) -> dict[str, Any]:
    reproj, w_err = errors(client, build(input))
    return {
        "reproj_error": {"elements": reproj[0].tolist(), "repeated": int(reproj.shape[0])},
        "w_err": {"element": float(w_err[0]), "repeated": int(w_err.size)},
    }


def jacobian(client: Client, input: Mapping[str, Any]) -> dict[str, Any]:
    problem = build(input)
    matrix = sparse_jacobian(problem, blocks(client, problem))
    return {
        "rows": [int(v) for v in _excerpt(matrix["rows"])],
        "cols": [int(v) for v in _excerpt(matrix["cols"])],
        "vals": [float(v) for v in _excerpt(matrix["vals"])],
    }


FUNCTIONS: Mapping[str, Evaluate] = {"objective": objective, "jacobian": jacobian}
