"""`make bench-cold`: cold programs through the running service (issue 21, point 4).

A cold request is the first of its program in a worker: the worker builds it (parse, Keras build,
tracing, the first call's graph optimization and instantiation) before it computes. Starts
tapeserve with one worker and times, sequentially with one keep-alive client:

- rosen10 gradient+Hessian (float64), once per distinct program (a constant added to the text
  makes each one a cache miss): p50 and p99 of the wall time (target: p50 <= 100 ms);
- each model-spec layer family, on /v1/model/gradient (with and without an HVP) and
  /v1/model/train-step: a few distinct programs each (the last Dense layer's width varies), every
  time against the default request deadline (TAPESERVE_REQUEST_TIMEOUT_S).

Every timed request is a miss, and the first program of each kind in the worker is timed too
(`first_ms`), as a client would meet it. The machine's load average is recorded before and after:
these numbers scale with it. Results go to
bench/results/cold.json. Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/cold.py` puts bench/, not the repository, on the path
    sys.path.insert(0, str(ROOT))

from bench.run import RESULTS, ROSEN, X10, machine, server, summary, tapeserve  # noqa: E402

# The default request deadline (service/api/settings.py, TAPESERVE_REQUEST_TIMEOUT_S).
DEFAULT_DEADLINE_S = 30.0
BATCH = 8

# (family, input_shape, layers before the final Dense, integer inputs)
FAMILIES: list[tuple[str, list[int], list[dict[str, Any]], bool]] = [
    ("dense", [16], [{"type": "dense", "units": 32, "activation": "relu"}], False),
    ("conv1d", [16, 3], [{"type": "conv1d", "filters": 4, "kernel_size": 3, "activation": "relu"},
                         {"type": "flatten"}], False),
    ("conv2d + max_pool2d", [8, 8, 1], [{"type": "conv2d", "filters": 4, "kernel_size": 3},
                                        {"type": "max_pool2d"}, {"type": "flatten"}], False),
    ("avg_pool2d", [8, 8, 2], [{"type": "avg_pool2d"}, {"type": "flatten"}], False),
    ("batch_norm", [16], [{"type": "dense", "units": 8}, {"type": "batch_norm"}], False),
    ("layer_norm", [16], [{"type": "dense", "units": 8}, {"type": "layer_norm"}], False),
    ("dropout", [16], [{"type": "dense", "units": 8}, {"type": "dropout", "rate": 0.2}], False),
    ("embedding", [6], [{"type": "embedding", "input_dim": 20, "output_dim": 4}, {"type": "flatten"}], True),
    ("simple_rnn", [8, 3], [{"type": "simple_rnn", "units": 8}], False),
    ("lstm", [8, 3], [{"type": "lstm", "units": 8}], False),
    ("gru", [8, 3], [{"type": "gru", "units": 8}], False),
]  # fmt: skip
KINDS = ("gradient", "gradient+hvp", "train-step")


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def rosen_cold(client: httpx.Client, count: int) -> dict[str, Any]:
    hess = {
        "expression": ROSEN,
        "variables": {"x": X10},
        "dtype": "float64",
        "derivatives": ["gradient", "hessian"],
    }
    walls, worker = [], []
    for i in range(count):
        start = time.perf_counter()
        answer = client.post("/v1/gradient", json={**hess, "expression": f"{ROSEN} + {i}"}).raise_for_status()
        walls.append((time.perf_counter() - start) * 1000.0)
        meta = answer.json()["meta"]
        if meta["cache"] != "miss":
            raise RuntimeError(f"program {i} was not cold: {meta}")
        worker.append(float(meta["total_ms"]))
    return {**summary(walls), "samples_ms": [round(w, 1) for w in walls],
            "worker_hop_p50_ms": statistics.median(worker)}  # fmt: skip


def model_body(
    shape: list[int], layers: list[dict[str, Any]], integer: bool, units: int, kind: str
) -> dict[str, Any]:
    rng = np.random.default_rng(units)
    x = rng.integers(0, 20, (BATCH, *shape)) if integer else rng.standard_normal((BATCH, *shape))
    model = {"input_shape": shape, "layers": [*layers, {"type": "dense", "units": units}]}
    y = rng.standard_normal((BATCH, units))
    body: dict[str, Any] = {"model": model, "x": x.tolist(), "y": y.tolist(), "loss": "mse"}
    if kind == "train-step":
        body["optimizer"] = {"type": "adam", "learning_rate": 0.01}
    return body


def family_cold(client: httpx.Client, count: int, deadline_s: float) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name, shape, layers, integer in FAMILIES:
        for kind in KINDS:
            walls: list[float] = []
            for i in range(count):
                body = model_body(shape, layers, integer, 1 + i, kind)
                path = "/v1/model/train-step" if kind == "train-step" else "/v1/model/gradient"
                if kind == "gradient+hvp":
                    # Tangents need the weights' shapes: /v1/model/describe answers without a worker.
                    described = client.post(
                        "/v1/model/describe", json={"model": body["model"]}
                    ).raise_for_status()
                    shapes = [w["shape"] for w in described.json()["weights"]]
                    body["tangents"] = [np.ones(s).tolist() for s in shapes]
                start = time.perf_counter()
                answer = client.post(path, json=body, timeout=deadline_s + 60)
                walls.append((time.perf_counter() - start) * 1000.0)
                if answer.status_code != 200:
                    raise RuntimeError(f"{name} {kind}: {answer.status_code} {answer.text[:300]}")
            rows[f"{name}, {kind}"] = {**summary(walls), "first_ms": walls[0], "max_ms": max(walls),
                                       "within_deadline": max(walls) <= deadline_s * 1000}  # fmt: skip
            print(f"  {name + ', ' + kind:<36} " + " ".join(f"{w:8.0f}" for w in walls), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rosen", type=int, default=15, help="distinct rosen10 programs")
    parser.add_argument("--models", type=int, default=3, help="distinct programs per layer family and kind")
    args = parser.parse_args()
    results: dict[str, Any] = {
        **machine(),
        "load_before": load(),
    }
    argv, port, env = tapeserve({})
    deadline_s = float(os.environ.get("TAPESERVE_REQUEST_TIMEOUT_S", DEFAULT_DEADLINE_S))
    with server(argv, port, "/readyz", env) as url, httpx.Client(base_url=url, timeout=120) as client:
        # One warm request first: the worker's own start-up is not what is measured.
        client.post(
            "/v1/gradient", json={"expression": "sum(x**2)", "variables": {"x": [1.0]}}
        ).raise_for_status()
        results["rosen10 gradient+hessian, cold"] = rosen_cold(client, args.rosen)
        print("layer families, ms per distinct program (first, then the others):")
        results["layer families, cold"] = family_cold(client, args.models, deadline_s)
    results["load_after"] = load()

    rosen = results["rosen10 gradient+hessian, cold"]
    print(f"machine: {results['machine']}, {results['when']}")
    print(f"load average (1, 5, 15 min): before {results['load_before']}, after {results['load_after']}")
    print(f"{'cold workload':<52} {'p50 ms':>9} {'max ms':>9}")
    target = "rosen10 gradient+hessian (target p50 <= 100 ms)"
    print(f"{target:<52} {rosen['p50_ms']:>9.1f} {max(rosen['samples_ms']):>9.1f}")
    for name, row in results["layer families, cold"].items():
        flag = "" if row["within_deadline"] else f"  over the {deadline_s:g} s deadline"
        print(f"{name:<52} {row['p50_ms']:>9.0f} {row['max_ms']:>9.0f}{flag}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cold.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
