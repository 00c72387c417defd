"""`make bench`: sequential latency of tapeserve against its compute floor and its HTTP floor.

Starts a tapeserve server and a minimal FastAPI echo server on loopback, drives both with one
keep-alive httpx client, measures the same work in-process with a cached tf.function, and prints one
table (p50/p99 in ms, ratios measured in this run) and writes bench/results/latest.json.
Numbers are comparable only within one run: these machines are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ROSEN = "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)"
X10 = [0.1 * i for i in range(10)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(argv: list[str], port: int, ready_path: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run a server process until the block ends; yields its base URL once ready_path answers 200."""
    proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + ready_path, timeout=1).status_code == 200:
                    break
            time.sleep(0.25)
        else:
            raise RuntimeError(f"{argv} did not become ready")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def timed(fn: Callable[[], Any], n: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000.0)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "n": len(ordered),
    }


def in_process(n: int) -> dict[str, dict[str, float]]:
    """The compute floor: the same work as a cached tf.function called in this process."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    def rosen(x: Any) -> Any:
        return tf.reduce_sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)

    spec = [tf.TensorSpec([10], tf.float64)]

    @tf.function(input_signature=spec)
    def grad(x: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = rosen(x)
        return y, tape.gradient(y, x)

    @tf.function(input_signature=spec)
    def grad_hess(x: Any) -> Any:
        with tf.GradientTape(persistent=True) as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = rosen(x)
            g = inner.gradient(y, x)
        return y, g, outer.jacobian(g, x)

    x = tf.constant(np.array(X10))
    return {
        "gradient": summary(timed(lambda: [t.numpy() for t in grad(x)], n)),
        "gradient+hessian": summary(timed(lambda: [t.numpy() for t in grad_hess(x)], n)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=500, help="requests per warm workload")
    parser.add_argument("--cold", type=int, default=15, help="distinct expressions for the cold workload")
    args = parser.parse_args()

    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "workloads": {},
    }
    rows = results["workloads"]

    echo_port, port = free_port(), free_port()
    python = sys.executable
    echo = [python, "-m", "uvicorn", "bench.echo_app:app", "--port", str(echo_port), "--log-level", "warning"]
    serve = [python, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    body = {"x": X10}
    with server(echo, echo_port, "/healthz") as echo_url, httpx.Client(base_url=echo_url) as client:
        rows["http floor (FastAPI echo)"] = summary(
            timed(lambda: client.post("/echo", json=body).raise_for_status(), args.n)
        )

    env = {"TAPESERVE_WORKERS": "1"}
    with server(serve, port, "/readyz", env) as url, httpx.Client(base_url=url, timeout=60) as client:

        def post(payload: dict[str, Any]) -> None:
            client.post("/v1/gradient", json=payload).raise_for_status()

        grad = {"expression": ROSEN, "variables": {"x": X10}, "dtype": "float64"}
        hess = {**grad, "derivatives": ["gradient", "hessian"]}
        rows["tapeserve rosen10 gradient (warm)"] = summary(timed(lambda: post(grad), args.n))
        rows["tapeserve rosen10 gradient+hessian (warm)"] = summary(timed(lambda: post(hess), args.n))
        counter = iter(range(10**9))
        rows["tapeserve rosen10 gradient+hessian (cold)"] = summary(
            timed(lambda: post({**hess, "expression": f"{ROSEN} + {next(counter)}"}), args.cold, warmup=1)
        )

    floor = in_process(args.n)
    rows["in-process tf.function gradient (compute floor)"] = floor["gradient"]
    rows["in-process tf.function gradient+hessian"] = floor["gradient+hessian"]

    http = rows["http floor (FastAPI echo)"]["p50_ms"]
    warm_grad = rows["tapeserve rosen10 gradient (warm)"]["p50_ms"]
    warm_hess = rows["tapeserve rosen10 gradient+hessian (warm)"]["p50_ms"]
    results["ratios"] = {
        "warm gradient p50 / http floor p50": warm_grad / http,
        "warm gradient+hessian p50 / http floor p50": warm_hess / http,
        "warm gradient p50 - in-process p50 (ms)": warm_grad - floor["gradient"]["p50_ms"],
    }

    print(f"{'workload':<52} {'p50 ms':>9} {'p99 ms':>9} {'n':>6}")
    for name, row in rows.items():
        print(f"{name:<52} {row['p50_ms']:>9.3f} {row['p99_ms']:>9.3f} {row['n']:>6}")
    for name, value in results["ratios"].items():
        print(f"{name:<52} {value:>9.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
