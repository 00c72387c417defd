"""ht: hand tracking's residuals (ADBench's HAND) and their Jacobian.

A hand model of B bones (a tree of 4x4 rigid transforms) skins V vertices; 26 pose parameters
``theta`` (global rotation and translation, then finger angles) pose it, and each of N observed
points is compared with a vertex (the "simple" case) or with a point ``us`` inside a triangle (the
"complicated" case, ``us`` non-empty). The residuals are ``points - hand point``, 3 per point.

Everything is computed in the service from the model's own arrays: the posed bone rotations (Euler
angles, Rz Ry Rx), the bone chain (parents before children, so ``depth`` applications of
``A = where(root, rel, A[parent] @ rel)`` give every absolute transform), linear blend skinning,
the global Rodrigues rotation (identity below an angle of 1e-4, as the eval does), and the gathers
of vertices by correspondence and triangle. The client only lays theta out as the eval's pose
table (which of the 26 parameters drive which bone axis: an index array, ``pose_slots``).

The Jacobian (3N rows; columns d/du_i0, d/du_i1 when complicated, then the 26 of theta) is computed
in forward mode, since 26 columns are far fewer than 3N rows: one batched ``jvp`` request seeds the
26 unit tangents of theta, and one seeds ``us``'s two columns for every point at once (a point's
residuals depend only on its own ``us``, so the tangent of all ones in column k returns every 3x2
block's column k: a compressed Jacobian). Requests go in chunks of ``CHUNK`` points.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from examples.gradbench import DTYPE, Evaluate
from service.client import Client

THETA = 26
FINGERS = 5
# Points per request: 26 tangents x 3 x CHUNK jvp entries stay within the per-tensor limit.
CHUNK = 32_768


def pose_slots(bones: int) -> np.ndarray:
    """Where each entry of the pose table (bones + 3 rows of 3) comes from, as indices into
    ``concatenate([theta, [0, 1]])``: row 0 the global rotation, row 1 the scale (ones), row 2 the
    translation, row 3 + b bone b's Euler angles (x, z, y). Each finger's bones 2..4 (after the
    wrist and the finger's first bone) take one angle, the first of them a second one too."""
    zero, one = THETA, THETA + 1
    slots = np.full((bones + 3, 3), zero, dtype=np.int64)
    slots[0], slots[1], slots[2] = [0, 1, 2], [one, one, one], [3, 4, 5]
    parameter = 6
    for finger in range(FINGERS):
        for k in range(3):
            row = 3 + 2 + 4 * finger + k
            slots[row, 0] = parameter
            parameter += 1
            if k == 0:
                slots[row, 1] = parameter
                parameter += 1
    if parameter != THETA:
        raise ValueError("the pose table must use all 26 parameters")
    return slots.ravel()


def depth(parents: np.ndarray) -> int:
    """The longest chain of parents (parents come before their children)."""
    levels = np.zeros(parents.size, dtype=np.int64)
    for bone, parent in enumerate(parents):
        levels[bone] = 0 if parent < 0 else levels[parent] + 1
    return int(levels.max(initial=0))


def _rotation(axis: str) -> str:
    # one axis's rotation matrices (B, 3, 3) from angles t (B,), laid out row by row
    one, zero, c, s, ms = "ones_like(t)", "zeros_like(t)", "cos(t)", "sin(t)", "-sin(t)"
    rows = {
        "x": [one, zero, zero, zero, c, ms, zero, s, c],
        "y": [c, zero, s, zero, one, zero, ms, zero, c],
        "z": [c, ms, zero, s, c, zero, zero, zero, one],
    }[axis]
    return f"reshape(stack([{', '.join(rows)}], axis=-1), (-1, 3, 3))"


def functions(chain_depth: int) -> dict[str, dict[str, Any]]:
    fns: dict[str, dict[str, Any]] = {
        "rot_x": {"params": ["t"], "body": _rotation("x")},
        "rot_y": {"params": ["t"], "body": _rotation("y")},
        "rot_z": {"params": ["t"], "body": _rotation("z")},
        # pose rows (B, 3) hold (x, z, y) angles; R = Rz Ry Rx
        "euler": {"params": ["a"], "body": "rot_z(a[:, 1]) @ rot_y(a[:, 2]) @ rot_x(a[:, 0])"},
        # the pose table (B + 3, 3) from theta
        "pose": {
            "params": ["theta", "slots"],
            "body": "reshape(gather(concatenate([theta, [0.0, 1.0]]), slots), (-1, 3))",
        },
        # base_relatives @ [[R, 0], [0, 1]]
        "posed_relatives": {
            "params": ["base", "R"],
            "body": "concatenate([base[:, :, 0:3] @ R, base[:, :, 3:4]], axis=2)",
        },
        "link": {
            "params": ["A", "rel", "parent", "root"],
            "body": "where(root > 0, rel, gather(A, parent) @ rel)",
        },
        # Rodrigues' rotation of rows X by the axis-angle aa; the identity below an angle of 1e-4
        "safe_angle": {"params": ["aa"], "body": "sqrt(where(sum(aa * aa) < 1e-8, 1.0, sum(aa * aa)))"},
        "unit": {"params": ["aa"], "body": "aa / safe_angle(aa)"},
        "rodrigues": {
            "params": ["k", "X"],
            "body": "X * cos(safe_angle(k)) + cross(unit(k) + zeros_like(X), X) * sin(safe_angle(k))"
            " + unit(k) * sum(unit(k) * X, axis=-1, keepdims=True) * (1 - cos(safe_angle(k)))",
        },
        "global_rotation": {
            "params": ["aa", "X"],
            "body": "where(sum(aa * aa) < 1e-8, X, rodrigues(aa, X))",
        },
    }
    absolutes = "rel"
    for _ in range(chain_depth):
        absolutes = f"link({absolutes}, rel, parent, root)"
    fns["absolutes"] = {"params": ["rel", "parent", "root"], "body": absolutes}
    # linear blend skinning as one matrix product: vertex v's blended transform (3 x 4) is its
    # weights times the bones' transforms, then applied to its base position
    fns["skinned"] = {
        "params": ["weights", "base_positions", "T"],
        "body": "sum(reshape(weights @ reshape(T[:, 0:3, :], (-1, 12)), (-1, 3, 4))"
        " * base_positions[:, None, :], axis=-1)",
    }
    fns["vertices"] = {
        "params": [
            "theta",
            "slots",
            "base_relatives",
            "parent",
            "root",
            "inverse_base_absolutes",
            "weights",
            "base_positions",
            "mirror",
        ],  # fmt: skip
        "body": "global_rotation(theta[0:3], mirror * skinned(weights, base_positions,"
        " absolutes(posed_relatives(base_relatives, euler(pose(theta, slots)[3:])), parent, root)"
        " @ inverse_base_absolutes)) + theta[3:6]",
    }
    return fns


_VERTICES = (
    "vertices(theta, slots, base_relatives, parent, root, inverse_base_absolutes, weights,"
    " base_positions, mirror)"
)
SIMPLE = f"reshape(points - gather({_VERTICES}, correspondences), (-1,))"
COMPLICATED = f"reshape(points - hand_points({_VERTICES}, gather(triangles, correspondences), us), (-1,))"
HAND_POINTS = {
    "params": ["P", "tri", "us"],
    "body": "us[:, 0:1] * gather(P, tri[:, 0]) + us[:, 1:2] * gather(P, tri[:, 1])"
    " + (1 - us[:, 0:1] - us[:, 1:2]) * gather(P, tri[:, 2])",
}


class Problem:
    """One eval input as arrays: the model's constants, and the points in chunks."""

    def __init__(self, input: Mapping[str, Any]) -> None:
        data, model = input["data"], input["data"]["model"]
        self.theta = np.asarray(input["theta"], np.float64)
        us = np.asarray(input.get("us", []), np.float64)
        self.complicated = us.size > 0
        self.us = us.reshape(-1, 2)
        self.points = np.asarray(data["points"], np.float64).reshape(-1, 3)
        self.correspondences = np.asarray(data["correspondences"], np.float64)
        parents = np.asarray(model["parents"], np.int64)
        bones = parents.size
        self.fns = functions(depth(parents))
        if self.complicated:
            self.fns["hand_points"] = HAND_POINTS
        self.model: dict[str, np.ndarray] = {
            "slots": pose_slots(bones).astype(np.float64),
            "base_relatives": np.asarray(model["base_relatives"], np.float64).reshape(bones, 4, 4),
            "parent": np.maximum(parents, 0).astype(np.float64),
            "root": (parents < 0).astype(np.float64).reshape(bones, 1, 1),
            "inverse_base_absolutes": np.asarray(model["inverse_base_absolutes"], np.float64).reshape(
                bones, 4, 4
            ),
            "weights": np.asarray(model["weights"], np.float64).reshape(-1, bones),
            "base_positions": np.asarray(model["base_positions"], np.float64).reshape(-1, 4),
            "mirror": np.array([-1.0 if model.get("is_mirrored") else 1.0, 1.0, 1.0]),
        }
        if self.complicated:
            self.model["triangles"] = np.asarray(model["triangles"], np.float64).reshape(-1, 3)

    @property
    def expression(self) -> str:
        return COMPLICATED if self.complicated else SIMPLE

    @property
    def count(self) -> int:
        return int(self.correspondences.size)

    def chunks(self) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
        """Each chunk's point data. Every request of a large problem has CHUNK points (the last
        padded with repeats of its first point, whose rows are dropped), so one compiled program
        serves every chunk."""
        n = self.count
        size = min(CHUNK, n)
        for start in range(0, max(n, 1), size):
            rows = np.arange(start, start + size)
            rows[rows >= n] = start
            part = {"points": self.points[rows], "correspondences": self.correspondences[rows]}
            if self.complicated:
                part["us"] = self.us[rows]
            yield slice(start, min(start + size, n)), part


def residuals(client: Client, problem: Problem) -> np.ndarray:
    """The 3N residuals, point by point (x, y, z)."""
    out = np.empty(3 * problem.count)
    for part, data in problem.chunks():
        value = client.compute(
            problem.expression,
            {"theta": problem.theta},
            constants=problem.model | data,
            functions=problem.fns,
            derivatives=(),
            dtype=DTYPE,
        ).value
        out[3 * part.start : 3 * part.stop] = np.asarray(value)[: 3 * (part.stop - part.start)]
    return out


def jacobian_matrix(client: Client, problem: Problem) -> np.ndarray:
    """The (3N, [2 +] 26) Jacobian: forward mode, one batched jvp per group of columns."""
    us_columns = 2 if problem.complicated else 0
    out = np.empty((3 * problem.count, us_columns + THETA))
    for part, data in problem.chunks():
        rows = slice(3 * part.start, 3 * part.stop)
        kept = 3 * (part.stop - part.start)
        by_theta = client.jvp(
            problem.expression,
            {"theta": np.tile(problem.theta, (THETA, 1))},
            tangents={"theta": np.eye(THETA)},
            constants=problem.model | data,
            functions=problem.fns,
            batch=True,
            dtype=DTYPE,
        )
        out[rows, us_columns:] = np.asarray(by_theta)[:, :kept].T
        if problem.complicated:
            us = data.pop("us")
            seeds = np.zeros((2, *us.shape))
            seeds[0, :, 0] = seeds[1, :, 1] = 1.0
            by_us = client.jvp(
                problem.expression,
                {"us": np.stack([us, us])},
                tangents={"us": seeds},
                constants=problem.model | data | {"theta": problem.theta},
                functions=problem.fns,
                batch=True,
                dtype=DTYPE,
            )
            out[rows, :2] = np.asarray(by_us)[:, :kept].T
    return out


def objective(client: Client, input: Mapping[str, Any]) -> list[float]:
    return [float(v) for v in residuals(client, Problem(input))]


def jacobian(client: Client, input: Mapping[str, Any]) -> list[list[float]]:
    return jacobian_matrix(client, Problem(input)).tolist()


FUNCTIONS: Mapping[str, Evaluate] = {"objective": objective, "jacobian": jacobian}
