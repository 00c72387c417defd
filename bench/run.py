"""`make bench`: tapeserve against its compute and HTTP floors, with --peers httpstan and UM-Bridge.

Starts the servers on loopback, drives them with one keep-alive httpx client (sequential latency)
and wrk (throughput), measures the same work in-process with a cached tf.function, prints one table
and writes bench/results/latest.json. Targets are ratios measured in this one run (these machines
are noisy); nothing here is a pass/fail test. ``--hogs N`` runs everything beside N busy loops, each in
its own session (someone else's work on the machine); ``--only hop`` is the short list issue 21 reads
(sequential gradient and wrk 16 for tapeserve and httpstan, and the interleaved rows).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/run.py` puts bench/, not the repository, on the path
    sys.path.insert(0, str(ROOT))

from examples import whole_runs  # noqa: E402
from examples.whole_runs import rosen_gradient  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ROSEN = "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)"
X10 = [0.1 * i for i in range(10)]
STAN_ROSEN = """
parameters { vector[10] x; }
model { target += -sum(100 * square(x[2:10] - square(x[1:9])) + square(1 - x[1:9])); }
"""
# The HMC target of the whole-run rows: -q'Pq / 2 with P the AR(1) precision (examples/whole_runs.py).
STAN_GAUSS = """
data { int d; matrix[d, d] P; }
parameters { vector[d] q; }
model { target += -0.5 * quad_form(P, q); }
"""
PEERS = ROOT / "bench" / ".peers" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --realtime N: every server and the measuring client run in SCHED_RR at N (tapeserve by its own
# TAPESERVE_REALTIME_PRIORITY, the peers under chrt), so no one's hop waits behind the hogs' slices.
REALTIME = 0


@contextlib.contextmanager
def server(argv: list[str], port: int, ready_path: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run a server process until the block ends; yields its base URL once ready_path answers 200."""
    if REALTIME and not (env or {}).get("TAPESERVE_REALTIME_PRIORITY"):
        argv = ["chrt", "--rr", str(REALTIME), *argv]  # a peer: the whole process at the same priority
    proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
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


class Samples(list[float]):
    """Latencies (ms), and how long this client thread itself waited to be scheduled per call (ms):
    with CPU hogs that wait is in every latency measured here, whichever server answers."""

    client_wait_ms: float | None = None


def run_delay_ns() -> int | None:
    """This thread's time spent runnable but not running, from /proc (None where there is none)."""
    try:
        with open("/proc/thread-self/schedstat", encoding="ascii") as schedstat:
            return int(schedstat.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None


def timed(fn: Callable[[], Any], n: int, warmup: int = 20) -> Samples:
    for _ in range(warmup):
        fn()
    out = Samples()
    waited = run_delay_ns()
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000.0)
    after = run_delay_ns()
    if waited is not None and after is not None and n:
        out.client_wait_ms = (after - waited) / 1e6 / n
    return out


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    out = {
        "p50_ms": statistics.median(ordered),
        "p90_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))],
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "n": len(ordered),
    }
    wait = getattr(samples, "client_wait_ms", None)
    if wait is not None:
        out["client_wait_ms_per_call"] = wait
    return out


@contextlib.contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    """``count`` busy loops for the block, each in its own session: someone else's work, which Linux's
    autogroups (on where sessions get one) weigh as other users' processes, not as ours."""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(count)
    ]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


def wrk(url: str, body: dict[str, Any], connections: int, seconds: int) -> dict[str, float]:
    """Throughput of POSTing ``body`` with wrk (one thread: the other core serves)."""
    if shutil.which("wrk") is None:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        payload = json.dumps(body).replace("\\", "\\\\").replace("'", "\\'")
        script.write(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = '{payload}'\n"
        )
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name, url],
            capture_output=True, text=True, timeout=seconds + 60, check=True,
        ).stdout  # fmt: skip
    finally:
        os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if m is None:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    return {
        "rps": rps,
        "p50_ms": pct("50"),
        "p99_ms": pct("99"),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


# wrk's first seconds on a fresh server: tapeserve traces each hot program's stacked (batched) form
# once per worker when requests first overlap, ~0.2-0.5 s in which the others queue. Measured apart.
WRK_FIRST_S = 2


def wrk16(rows: dict[str, Any], name: str, url: str, body: dict[str, Any], seconds: int) -> None:
    """``name``: 16 connections after a first short run, which is recorded as its own row."""
    rows[f"{name}, first {WRK_FIRST_S} s"] = wrk(url, body, 16, WRK_FIRST_S)
    rows[name] = wrk(url, body, 16, seconds)


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


def bench_echo(args: argparse.Namespace, rows: dict[str, Any]) -> None:
    port = free_port()
    echo = [sys.executable, "-m", "uvicorn", "bench.echo_app:app", "--port", str(port),
            "--log-level", "warning", "--loop", "uvloop", "--http", "httptools"]  # fmt: skip
    body = {"x": X10}
    with server(echo, port, "/healthz") as url, httpx.Client(base_url=url) as client:
        rows["http floor: FastAPI echo, sequential"] = summary(
            timed(lambda: client.post("/echo", json=body).raise_for_status(), args.n)
        )
        rows["http floor: FastAPI echo, wrk 16 conns"] = wrk(url + "/echo", body, 16, args.seconds)


def tapeserve(env: dict[str, str]) -> tuple[list[str], int, dict[str, str]]:
    port = free_port()
    argv = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning"]  # fmt: skip
    own = {"TAPESERVE_REALTIME_PRIORITY": str(REALTIME)} if REALTIME else {}
    return argv, port, {"TAPESERVE_WORKERS": "1", **own, **env}


def bench_tapeserve(args: argparse.Namespace, rows: dict[str, Any]) -> None:
    grad = {"expression": ROSEN, "variables": {"x": X10}, "dtype": "float64"}
    hess = {**grad, "derivatives": ["gradient", "hessian"]}
    # A 1M-element tensor as JSON lists is ~20 MB: above the default body limit, which is the point.
    argv, port, env = tapeserve({"TAPESERVE_MAX_BODY_BYTES": str(64 * 2**20)})
    with server(argv, port, "/readyz", env) as url, httpx.Client(base_url=url, timeout=120) as client:

        def post(payload: dict[str, Any]) -> httpx.Response:
            return client.post("/v1/gradient", json=payload).raise_for_status()

        hops: list[float] = []  # the server's own dispatch -> result time of each warm gradient

        def post_grad() -> None:
            hops.append(post(grad).json()["meta"]["total_ms"])

        rows["tapeserve rosen10 gradient, warm, sequential"] = summary(timed(post_grad, args.n))
        rows["  of which API -> worker -> API (meta.total_ms)"] = summary(hops[-args.n :])
        if args.only == "hop":
            wrk16(rows, "tapeserve rosen10 gradient, wrk 16 conns", url + "/v1/gradient", grad, args.seconds)
            return
        rows["tapeserve rosen10 gradient+hessian, warm, sequential"] = summary(
            timed(lambda: post(hess), args.n)
        )
        counter = iter(range(10**9))
        rows["tapeserve rosen10 gradient+hessian, cold, sequential"] = summary(
            timed(lambda: post({**hess, "expression": f"{ROSEN} + {next(counter)}"}), args.cold, warmup=1)
        )
        wrk16(rows, "tapeserve rosen10 gradient, wrk 16 conns", url + "/v1/gradient", grad, args.seconds)
        rows["tapeserve rosen10 gradient, wrk 32 conns, batching on"] = wrk(
            url + "/v1/gradient", grad, 32, args.seconds
        )
        batching = client.get("/readyz").json().get("batching", {})
        rows["tapeserve rosen10 gradient, wrk 32 conns, batching on"]["stacked_requests"] = batching.get(
            "stacked_requests", 0
        )

        grid = np.linspace(-3, 3, 1000).tolist()
        batch = {"expression": "sin(x) * exp(-x**2 / 4)", "variables": {"x": grid}, "batch": True,
                 "derivatives": ["gradient", "hessian"], "dtype": "float64"}  # fmt: skip
        rows["batch: f, f', f'' on a 1,000-point grid"] = summary(
            timed(lambda: post(batch), max(20, args.n // 10))
        )

        big = np.random.default_rng(0).standard_normal(1_000_000).astype(np.float32)
        as_json = {"expression": "sum(sin(x))", "variables": {"x": big.tolist()}}
        b64 = {"dtype": "float32", "shape": [big.size], "b64": base64.b64encode(big.tobytes()).decode()}
        as_b64 = {"expression": "sum(sin(x))", "variables": {"x": b64}, "encoding": "base64"}
        rows["large: 1M-element gradient, JSON lists"] = summary(timed(lambda: post(as_json), 5, warmup=1))
        rows["large: 1M-element gradient, base64"] = summary(timed(lambda: post(as_b64), 10, warmup=1))

    argv, port, env = tapeserve({"TAPESERVE_BATCH_WINDOW_MS": "0"})
    with server(argv, port, "/readyz", env) as url, httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(20):
            client.post("/v1/gradient", json=grad).raise_for_status()
        rows["tapeserve rosen10 gradient, wrk 32 conns, batching off"] = wrk(
            url + "/v1/gradient", grad, 32, args.seconds
        )


MLP = {"input_shape": [32], "layers": [{"type": "dense", "units": 64, "activation": "relu"},
                                       {"type": "dense", "units": 1}], "seed": 0}  # fmt: skip


def b64(array: np.ndarray) -> dict[str, Any]:
    """A float32 tensor in the base64 wire form (little-endian bytes)."""
    a = np.asarray(array, "<f4")  # tobytes() is C order; ascontiguousarray would make a scalar 1-d
    return {"dtype": "float32", "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


def from_b64(tensor: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(tensor["b64"]), tensor["dtype"]).reshape(tensor["shape"])


def bench_training(args: argparse.Namespace, rows: dict[str, Any]) -> None:
    """One Adam step with clip-by-norm on a 32-64-1 MLP, batch 64; and 500 steps in one request.

    Tensors travel the way the SDK sends them (base64 above 256 elements): x, y, weights and
    optimizer_state as base64, and "encoding": "base64" for the response. Like the SDK, the client
    decodes each response's weights and state to numpy and encodes them again for the next step
    (the API is stateless), so that work is in the measured latency too.
    """
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 32)), rng.normal(size=(64, 1))
    base = {"model": MLP, "x": b64(x), "y": b64(y), "loss": "mse", "encoding": "base64",
            "optimizer": {"type": "adam", "learning_rate": 0.001}, "clip": {"norm": 1.0}}  # fmt: skip
    argv, port, env = tapeserve({})
    with server(argv, port, "/readyz", env) as url, httpx.Client(base_url=url, timeout=300) as client:

        def post(body: dict[str, Any]) -> dict[str, Any]:
            out: dict[str, Any] = client.post("/v1/model/train-step", json=body).raise_for_status().json()
            return out

        first = post(base)
        state = {k: [from_b64(t) for t in first[k]] for k in ("weights", "optimizer_state")}

        def one_step() -> None:
            body = {**base, **{k: [b64(a) for a in v] for k, v in state.items()}}
            out = post(body)
            state.update({k: [from_b64(t) for t in out[k]] for k in state})

        rows["training: one Adam step (32-64-1, batch 64), sequential"] = summary(
            timed(one_step, args.n // 2)
        )
        many = {**base, "steps": 500}
        post(many)
        rows["training: 500 steps in one request"] = summary(timed(lambda: post(many), 5, warmup=1))
    rows.update(training_in_process(x, y, args.n // 2))


def training_in_process(x: np.ndarray, y: np.ndarray, n: int) -> dict[str, Any]:
    """The floor: the guide's custom training loop, a tf.function step in this process."""
    import keras
    import tensorflow as tf

    model = keras.Sequential(
        [keras.Input((32,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)]
    )
    optimizer = keras.optimizers.Adam(learning_rate=0.001, clipnorm=1.0)
    loss_fn = keras.losses.MeanSquaredError()
    xt, yt = tf.constant(x, tf.float32), tf.constant(y, tf.float32)

    @tf.function
    def step(xb: Any, yb: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    def loop() -> None:
        for _ in range(500):
            step(xt, yt)
        float(step(xt, yt))

    return {
        "in-process: one Adam step (tf.function)": summary(timed(lambda: float(step(xt, yt)), n)),
        "in-process: 500 steps": summary(timed(loop, 5, warmup=1)),
    }


def bench_memory(count: int, rows: dict[str, Any]) -> None:
    """Distinct expressions one after another: the program cache evicts, recycling bounds RSS."""
    bound_mb = 1500
    argv, port, env = tapeserve({"TAPESERVE_WORKER_MEMORY_MB": str(bound_mb), "TAPESERVE_CACHE_SIZE": "256"})
    samples: list[float] = []
    with server(argv, port, "/readyz", env) as url, httpx.Client(base_url=url, timeout=120) as client:
        start = time.perf_counter()
        for k in range(count):
            body = {"expression": f"sum(sin(x) * {k + 1}) + {k}", "variables": {"x": [0.5, 1.5]}}
            client.post("/v1/gradient", json=body).raise_for_status()
            if k % 250 == 0 or k == count - 1:
                workers = client.get("/readyz").json()["pool"]["workers"]
                reported = [w["rss_mb"] for w in workers if w.get("rss_mb")]  # none while a worker restarts
                if reported:
                    samples.append(max(reported))
        restarts = client.get("/readyz").json()["pool"]["workers"][0].get("restarts")
    rows[f"memory: {count} distinct expressions"] = {
        "max_worker_rss_mb": max(samples),
        "bound_mb": bound_mb,
        "rss_samples_mb": [round(s) for s in samples],
        "restarts": restarts,
        "seconds": time.perf_counter() - start,
    }


def bench_httpstan(args: argparse.Namespace, rows: dict[str, Any]) -> None:
    port = free_port()
    with server([str(PEERS), "-m", "httpstan", "--port", str(port)], port, "/v1/health") as url:
        with httpx.Client(base_url=url, timeout=600) as client:
            model = client.post("/v1/models", json={"program_code": STAN_ROSEN}).raise_for_status().json()
            path = f"/v1/{model['name']}/log_prob_grad"
            body = {"data": {}, "unconstrained_parameters": X10, "adjust_transform": False}
            grad = client.post(path, json=body).raise_for_status().json()
            assert len(grad["log_prob_grad"]) == 10
            rows["httpstan rosen10 gradient, sequential"] = summary(
                timed(lambda: client.post(path, json=body).raise_for_status(), args.n)
            )
            wrk16(rows, "httpstan rosen10 gradient, wrk 16 conns", url + path, body, args.seconds)


def umbridge_peer() -> tuple[list[str], int]:
    port = free_port()
    return [sys.executable, str(ROOT / "bench" / "umbridge_peer.py"), str(port)], port


UMBRIDGE_BODY = {"name": "rosen10", "outWrt": 0, "inWrt": 0, "input": [X10], "sens": [1.0], "config": {}}


def bench_umbridge(args: argparse.Namespace, rows: dict[str, Any]) -> None:
    """UM-Bridge's own Python server (bench/umbridge_peer.py: a tf.function rosen10), as httpstan above."""
    argv, port = umbridge_peer()
    with server(argv, port, "/Info") as url, httpx.Client(base_url=url, timeout=120) as client:
        grad = client.post("/Gradient", json=UMBRIDGE_BODY).raise_for_status().json()["output"]
        check("UM-Bridge rosen10 gradient", np.asarray(grad), rosen_gradient(np.array(X10)), 1e-12)
        rows["UM-Bridge rosen10 gradient, sequential"] = summary(
            timed(lambda: client.post("/Gradient", json=UMBRIDGE_BODY).raise_for_status(), args.n)
        )
        wrk16(
            rows, "UM-Bridge rosen10 gradient, wrk 16 conns", url + "/Gradient", UMBRIDGE_BODY, args.seconds
        )


def bench_interleaved(args: argparse.Namespace, rows: dict[str, Any], rounds: int = 10) -> None:
    """Target 1 with tapeserve, httpstan and UM-Bridge running side by side, in alternating blocks.

    The separate workloads above run minutes apart, and this machine's speed drifts over minutes by
    more than the difference being measured; alternating blocks of 100 requests (order reversed every
    round) gives the servers the same conditions. Each p50 is over all its rounds' samples.
    """
    grad = {"expression": ROSEN, "variables": {"x": X10}, "dtype": "float64"}
    hess = {**grad, "derivatives": ["gradient", "hessian"]}
    argv, port, env = tapeserve({})
    stan_port = free_port()
    umb_argv, umb_port = umbridge_peer()
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(server(argv, port, "/readyz", env))
        stan_url = stack.enter_context(
            server([str(PEERS), "-m", "httpstan", "--port", str(stan_port)], stan_port, "/v1/health")
        )
        umb_url = stack.enter_context(server(umb_argv, umb_port, "/Info"))
        umb = stack.enter_context(httpx.Client(base_url=umb_url))
        ours = stack.enter_context(httpx.Client(base_url=url))
        stan = stack.enter_context(httpx.Client(base_url=stan_url, timeout=600))
        model = stan.post("/v1/models", json={"program_code": STAN_ROSEN}).raise_for_status().json()
        path = f"/v1/{model['name']}/log_prob_grad"
        body = {"data": {}, "unconstrained_parameters": X10, "adjust_transform": False}
        workloads: dict[str, Callable[[], Any]] = {
            "interleaved: tapeserve rosen10 gradient": lambda: ours.post(
                "/v1/gradient", json=grad
            ).raise_for_status(),
            "interleaved: tapeserve rosen10 gradient+hessian": lambda: ours.post(
                "/v1/gradient", json=hess
            ).raise_for_status(),
            "interleaved: httpstan rosen10 gradient": lambda: stan.post(path, json=body).raise_for_status(),
            "interleaved: UM-Bridge rosen10 gradient": lambda: umb.post(
                "/Gradient", json=UMBRIDGE_BODY
            ).raise_for_status(),
        }
        samples: dict[str, list[float]] = {name: [] for name in workloads}
        block = max(20, args.n // 5)
        for r in range(rounds):
            order = list(workloads) if r % 2 == 0 else list(reversed(workloads))
            for name in order:
                samples[name] += timed(workloads[name], block, warmup=20 if r == 0 else 5)
    for name, values in samples.items():
        rows[name] = summary(values)


# Whole runs (issue 21 point 3): a run is one request, or one gradient request per step.
ADAM_STEPS, LEAPFROG_STEPS, LEAPFROG_EPS, RHO = 100, 20, 0.1, 0.9
# Both sides run the same float64 arithmetic on the same inputs; what differs is the order of
# rounding (TensorFlow's or numpy's sums, Keras' update vs examples/whole_runs.adam, which copies its
# float32 learning rate and bias-correction betas). Measured: ~3e-16 after 100 Adam steps, ~1e-15
# after 20 leapfrog steps (a stable linear map here: eps * sqrt(max eigenvalue of P) = 0.44 < 2,
# so rounding does not grow). 1e-9 relative to max(1, |value|) leaves room and still catches any
# real difference (a wrong step, a missing half-kick, float32 anywhere: >= 1e-8).
WHOLE_RUN_TOLERANCE = 1e-9
CHECKS: dict[str, float] = {}
ADAM_ONE = f"whole run: {ADAM_STEPS} Adam steps, tapeserve, 1 request"
LEAP_ONE = f"whole run: {LEAPFROG_STEPS} leapfrog steps, tapeserve, 1 request"


def adam_seq(system: str) -> str:
    return f"whole run: {ADAM_STEPS} Adam steps, {system}, {ADAM_STEPS} gradient requests"


def leap_seq(system: str) -> str:
    return f"whole run: {LEAPFROG_STEPS} leapfrog steps, {system}, {LEAPFROG_STEPS + 1} gradient requests"


def check(what: str, actual: Any, expected: Any, tolerance: float = WHOLE_RUN_TOLERANCE) -> float:
    """The largest error relative to max(1, |expected|); a mismatch is printed loudly, not raised."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    error = float(np.max(np.abs(a - e) / np.maximum(1.0, np.abs(e)))) if a.shape == e.shape else float("inf")
    CHECKS[what] = error
    if not error <= tolerance:
        banner = "!" * 100
        print(f"{banner}\nMISMATCH: {what}: error {error:.3g} > {tolerance:g}\n"
              f"  got      {a.ravel()[:6]}\n  expected {e.ravel()[:6]}\n{banner}", flush=True)  # fmt: skip
    return error


def alternating(
    workloads: dict[str, Callable[[], Any]], rounds: int, per_round: int
) -> dict[str, list[float]]:
    """Whole-run times (ms) in alternating blocks, order reversed every round (see bench_interleaved)."""
    samples: dict[str, list[float]] = {name: [] for name in workloads}
    for r in range(rounds):
        order = list(workloads) if r % 2 == 0 else list(reversed(workloads))
        for name in order:
            samples[name] += timed(workloads[name], per_round, warmup=1)
    return samples


def bench_whole_runs(args: argparse.Namespace, rows: dict[str, Any]) -> None:
    """100 Adam steps on rosen10 and a 20-step leapfrog trajectory: one request vs one per gradient.

    The sequential forms are examples/whole_runs.py's numpy loops fed by one gradient request per
    step (Adam: 100; leapfrog: 21, the first gradient and one after each drift). With --peers the
    same loops run on httpstan's log_prob_grad and, for Adam, on UM-Bridge's Gradient: neither has
    a one-request form of this work (httpstan's only run is an adaptive NUTS sampler, UM-Bridge
    has no loops), so they are compared by their sequential runs.
    """
    wr = whole_runs
    x0 = np.array(X10)
    d = 10
    precision = wr.ar1_precision(d, RHO)
    rng = np.random.default_rng(0)
    q0, p0 = rng.standard_normal(d), rng.standard_normal(d)
    adam_body = wr.adam_request(x0, ADAM_STEPS)
    trajectory_body = wr.trajectory_request(q0, p0, precision, LEAPFROG_EPS, LEAPFROG_STEPS)
    adam_ref = wr.adam(wr.rosen_gradient, x0, ADAM_STEPS)
    leap_ref = np.hstack(wr.leapfrog(lambda q: -precision @ q, q0, p0, LEAPFROG_EPS, LEAPFROG_STEPS))
    argv, port, env = tapeserve({})
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(server(argv, port, "/readyz", env))
        ours = stack.enter_context(httpx.Client(base_url=url, timeout=120))

        def adam_one() -> np.ndarray:
            out = ours.post("/v1/step", json=adam_body).raise_for_status().json()
            return np.asarray(out["variables"]["x"])

        def ts_rosen_grad(x: np.ndarray) -> np.ndarray:
            body = wr.gradient_request(wr.ROSEN, "x", x)
            return np.asarray(ours.post("/v1/gradient", json=body).raise_for_status().json()["gradient"]["x"])

        def ts_logp_grad(q: np.ndarray) -> np.ndarray:
            body = wr.gradient_request(wr.LOGP, "q", q, constants={"P": precision.tolist()})
            return np.asarray(ours.post("/v1/gradient", json=body).raise_for_status().json()["gradient"]["q"])

        def trajectory_one() -> np.ndarray:
            out = ours.post("/v1/gradient", json=trajectory_body).raise_for_status().json()
            return np.asarray(out["value"])

        workloads: dict[str, Callable[[], Any]] = {
            ADAM_ONE: adam_one,
            adam_seq("tapeserve"): lambda: wr.adam(ts_rosen_grad, x0, ADAM_STEPS),
            LEAP_ONE: trajectory_one,
            leap_seq("tapeserve"): lambda: np.hstack(
                wr.leapfrog(ts_logp_grad, q0, p0, LEAPFROG_EPS, LEAPFROG_STEPS)
            ),
        }
        if args.peers:
            stan_port = free_port()
            stan_url = stack.enter_context(
                server([str(PEERS), "-m", "httpstan", "--port", str(stan_port)], stan_port, "/v1/health")
            )
            stan = stack.enter_context(httpx.Client(base_url=stan_url, timeout=600))
            rosen_model = stan.post("/v1/models", json={"program_code": STAN_ROSEN}).raise_for_status().json()
            gauss_model = stan.post("/v1/models", json={"program_code": STAN_GAUSS}).raise_for_status().json()
            rosen_path = f"/v1/{rosen_model['name']}/log_prob_grad"
            gauss_path = f"/v1/{gauss_model['name']}/log_prob_grad"
            gauss_data = {"d": d, "P": precision.tolist()}

            def stan_rosen_grad(x: np.ndarray) -> np.ndarray:  # target is -rosen
                body = {"data": {}, "unconstrained_parameters": x.tolist(), "adjust_transform": False}
                return -np.asarray(
                    stan.post(rosen_path, json=body).raise_for_status().json()["log_prob_grad"]
                )

            def stan_logp_grad(q: np.ndarray) -> np.ndarray:
                body = {"data": gauss_data, "unconstrained_parameters": q.tolist(), "adjust_transform": False}
                return np.asarray(stan.post(gauss_path, json=body).raise_for_status().json()["log_prob_grad"])

            argv_u, port_u = umbridge_peer()
            umb_url = stack.enter_context(server(argv_u, port_u, "/Info"))
            umb = stack.enter_context(httpx.Client(base_url=umb_url, timeout=120))

            def umb_rosen_grad(x: np.ndarray) -> np.ndarray:
                body = {**UMBRIDGE_BODY, "input": [x.tolist()]}
                return np.asarray(umb.post("/Gradient", json=body).raise_for_status().json()["output"])

            workloads[adam_seq("httpstan")] = lambda: wr.adam(stan_rosen_grad, x0, ADAM_STEPS)
            workloads[adam_seq("UM-Bridge")] = lambda: wr.adam(umb_rosen_grad, x0, ADAM_STEPS)
            workloads[leap_seq("httpstan")] = lambda: np.hstack(
                wr.leapfrog(stan_logp_grad, q0, p0, LEAPFROG_EPS, LEAPFROG_STEPS)
            )
        # Every form's answer, once (the runs are deterministic), before timing: each against numpy
        # (examples/whole_runs.py's loops on hand-written gradients) and each one-request run against
        # the same loop fed by tapeserve's gradient requests.
        answers = {name: run() for name, run in workloads.items()}
        for name, answer in answers.items():
            check(f"{name} vs numpy", answer, adam_ref if "Adam" in name else leap_ref)
        check(f"{ADAM_ONE} vs {adam_seq('tapeserve')}", answers[ADAM_ONE], answers[adam_seq("tapeserve")])
        check(f"{LEAP_ONE} vs {leap_seq('tapeserve')}", answers[LEAP_ONE], answers[leap_seq("tapeserve")])
        runs = max(6, args.n // 25)
        samples = alternating(workloads, rounds=max(2, runs // 4), per_round=min(4, runs))
    for name, values in samples.items():
        rows[name] = summary(values)


def ratio(rows: dict[str, Any], a: str, b: str, key: str) -> float | None:
    if a in rows and b in rows and rows[a].get(key) and rows[b].get(key):
        return float(rows[a][key]) / float(rows[b][key])
    return None


def _spread(rows: dict[str, Any], name: str) -> float | None:
    """p99 / p50 of one workload: how far its tail reaches past its middle."""
    return ratio(rows, name, name, "p99_ms") and float(rows[name]["p99_ms"]) / float(rows[name]["p50_ms"])


def difference(rows: dict[str, Any], a: str, b: str) -> float | None:
    if a in rows and b in rows:
        return float(rows[a]["p50_ms"]) - float(rows[b]["p50_ms"])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=500, help="requests per sequential workload")
    parser.add_argument("--cold", type=int, default=15, help="distinct expressions for the cold workload")
    parser.add_argument("--seconds", type=int, default=8, help="duration of each wrk run")
    parser.add_argument("--peers", action="store_true", help="also measure httpstan and UM-Bridge")
    parser.add_argument("--memory", type=int, default=0, help="distinct expressions for the memory workload")
    parser.add_argument("--memory-only", action="store_true", help="run only the memory workload")
    parser.add_argument(
        "--only", choices=["training", "whole-runs", "hop"], help="run only this workload (results/NAME.json)"
    )
    parser.add_argument("--hogs", type=int, default=0, help="busy loops running beside the whole bench")
    parser.add_argument(
        "--realtime",
        type=int,
        default=0,
        help="SCHED_RR priority (2-99) of every server and this client (CAP_SYS_NICE); wrk stays ordinary",
    )
    args = parser.parse_args()
    if args.realtime:
        global REALTIME
        REALTIME = args.realtime
        # This thread only; what it starts (servers, wrk) begins ordinary and takes its own priority.
        os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(args.realtime))
    with cpu_hogs(args.hogs):
        run(args)


def machine() -> dict[str, Any]:
    """What every results file starts with: the machine and when the run began."""
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def run(args: argparse.Namespace) -> None:
    results: dict[str, Any] = {
        **machine(),
        "hogs": args.hogs,
        "realtime": args.realtime,
        "load_average_before": os.getloadavg(),
        "workloads": {},
    }
    rows: dict[str, Any] = results["workloads"]
    if args.memory_only:
        bench_memory(args.memory or 10_000, rows)
        print(json.dumps(rows, indent=2))
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "memory.json").write_text(json.dumps(results, indent=2) + "\n")
        return
    if not args.only:
        bench_echo(args, rows)
    if args.only in (None, "hop"):
        bench_tapeserve(args, rows)
    if args.only in (None, "training"):
        bench_training(args, rows)
    if args.only in (None, "whole-runs"):
        bench_whole_runs(args, rows)
    if args.peers and args.only in (None, "hop"):
        bench_httpstan(args, rows)
        if not args.only:
            bench_umbridge(args, rows)
        bench_interleaved(args, rows)
    if args.memory and not args.only:
        bench_memory(args.memory, rows)
    if not args.only:
        floor = in_process(args.n)
        rows["in-process tf.function rosen10 gradient (compute floor)"] = floor["gradient"]
        rows["in-process tf.function rosen10 gradient+hessian"] = floor["gradient+hessian"]

    seq, hs = "tapeserve rosen10 gradient, warm, sequential", "httpstan rosen10 gradient, sequential"
    mixed = "interleaved: httpstan rosen10 gradient"
    results["ratios"] = {
        "1. warm gradient p50 / httpstan p50, interleaved (target <= 1.0)": ratio(
            rows, "interleaved: tapeserve rosen10 gradient", mixed, "p50_ms"
        ),
        "1. warm gradient+hessian p50 / httpstan gradient p50, interleaved (target <= 1.5)": ratio(
            rows, "interleaved: tapeserve rosen10 gradient+hessian", mixed, "p50_ms"
        ),
        "1. warm gradient p50 / httpstan p50, separate runs": ratio(rows, seq, hs, "p50_ms"),
        "1. warm gradient+hessian p50 / httpstan gradient p50, separate runs": ratio(
            rows, "tapeserve rosen10 gradient+hessian, warm, sequential", hs, "p50_ms"
        ),
        "1'. warm gradient p50 / FastAPI echo p50": ratio(
            rows, seq, "http floor: FastAPI echo, sequential", "p50_ms"
        ),
        "2. 16-conn throughput / httpstan (target >= 1.0)": ratio(
            rows, "tapeserve rosen10 gradient, wrk 16 conns", "httpstan rosen10 gradient, wrk 16 conns", "rps"
        ),
        "5. 32-conn throughput, batching on / off": ratio(
            rows,
            "tapeserve rosen10 gradient, wrk 32 conns, batching on",
            "tapeserve rosen10 gradient, wrk 32 conns, batching off",
            "rps",
        ),
        "6. 1M-element round trip, JSON / base64 (target >= 5)": ratio(
            rows, "large: 1M-element gradient, JSON lists", "large: 1M-element gradient, base64", "p50_ms"
        ),
        "8. one train step p50 - in-process step p50, ms (target <= 1.5)": difference(
            rows,
            "training: one Adam step (32-64-1, batch 64), sequential",
            "in-process: one Adam step (tf.function)",
        ),
        "8. 500 steps in one request / in-process loop (target <= 2)": ratio(
            rows, "training: 500 steps in one request", "in-process: 500 steps", "p50_ms"
        ),
    }

    for name in [ADAM_ONE, LEAP_ONE]:
        steps = ADAM_STEPS if name == ADAM_ONE else LEAPFROG_STEPS
        for system in ["tapeserve", "httpstan", "UM-Bridge"]:
            sequential = adam_seq(system) if name == ADAM_ONE else leap_seq(system)
            what = f"{steps} Adam steps" if name == ADAM_ONE else f"{steps} leapfrog steps"
            if sequential in rows:
                results["ratios"][f"3. {what}: {system} sequential requests / tapeserve 1 request"] = ratio(
                    rows, sequential, name, "p50_ms"
                )
    umb_mixed, umb_wrk = "interleaved: UM-Bridge rosen10 gradient", "UM-Bridge rosen10 gradient, wrk 16 conns"
    results["ratios"].update({
        "5'. UM-Bridge gradient p50 / httpstan p50, interleaved": ratio(
            rows, umb_mixed, mixed, "p50_ms"
        ),
        "5'. tapeserve gradient p50 / UM-Bridge p50, interleaved": ratio(
            rows, "interleaved: tapeserve rosen10 gradient", umb_mixed, "p50_ms"
        ),
        "5'. 16-conn throughput, tapeserve / UM-Bridge": ratio(
            rows, "tapeserve rosen10 gradient, wrk 16 conns", umb_wrk, "rps"
        ),
        "5'. 16-conn throughput, UM-Bridge / httpstan": ratio(
            rows, umb_wrk, "httpstan rosen10 gradient, wrk 16 conns", "rps"
        ),
    })  # fmt: skip
    ts_seq, ts_mixed = seq, "interleaved: tapeserve rosen10 gradient"
    ts_wrk, hs_wrk = "tapeserve rosen10 gradient, wrk 16 conns", "httpstan rosen10 gradient, wrk 16 conns"
    results["ratios"].update({
        "21. warm gradient p50 / httpstan p50, interleaved (target <= 1.2 with hogs)": ratio(
            rows, ts_mixed, mixed, "p50_ms"
        ),
        "21. 16-conn throughput / httpstan (target >= 1.0)": ratio(rows, ts_wrk, hs_wrk, "rps"),
        "21. sequential p99 / p50, tapeserve (target <= 2)": _spread(rows, ts_seq),
        "21. sequential p99 / p50, tapeserve interleaved": _spread(rows, ts_mixed),
        "21. sequential p99 / p50, httpstan interleaved (for comparison)": _spread(rows, mixed),
        "21. wrk 16 p99 / httpstan's (target <= 3)": ratio(rows, ts_wrk, hs_wrk, "p99_ms"),
        f"21. wrk 16 p99 / httpstan's, first {WRK_FIRST_S} s on a fresh server": ratio(
            rows, f"{ts_wrk}, first {WRK_FIRST_S} s", f"{hs_wrk}, first {WRK_FIRST_S} s", "p99_ms"
        ),
    })  # fmt: skip
    if CHECKS:
        rows["checks: max error relative to max(1, |reference|)"] = dict(CHECKS)
        results["mismatches"] = [name for name, error in CHECKS.items() if not error <= WHOLE_RUN_TOLERANCE]

    print(f"machine: {results['machine']}, {results['when']}")
    # "client wait": how long the measuring client itself waited to be scheduled per call (ms).
    print(f"{'workload':<62} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>9} {'p90 ms':>9} {'client wait':>11}")
    for name, row in rows.items():
        if "p50_ms" in row or "rps" in row:
            p50, p99, rps = row.get("p50_ms", float("nan")), row.get("p99_ms", float("nan")), row.get("rps")
            p90, wait = row.get("p90_ms"), row.get("client_wait_ms_per_call")
            extra = ("" if rps is None else f"{rps:>9.0f}").rjust(9)
            extra += ("" if p90 is None else f" {p90:>9.3f}").rjust(10)
            extra += "" if wait is None else f" {wait:>11.3f}"
            print(f"{name:<62} {p50:>9.3f} {p99:>9.3f} {extra}")
        else:
            print(f"{name:<62} {json.dumps(row)}")
    for name, value in results["ratios"].items():
        print(f"{name:<84} {'n/a' if value is None else f'{value:.3f}'}")
    if results.get("mismatches"):
        print(f"!!! MISMATCH in {len(results['mismatches'])} checks: {results['mismatches']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = (args.only or "latest") + (f"-hogs{args.hogs}" if args.hogs else "")
    name += f"-rt{args.realtime}" if args.realtime else ""
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
