"""`make soak`: many connections for N minutes over a mixed workload; unexpected answers must be 0.

Starts a server (or uses --url), then C client tasks each loop over a shuffled mix: gradients (some
with fresh expressions, so programs keep compiling), Hessians, batch grids, expression steps, model
train steps and gradients, UM-Bridge calls, and invalid requests whose 4xx is the expected answer.
Every answer is checked against its expected status. /readyz is sampled every few seconds for every
worker's RSS. Prints a table and writes bench/results/soak.json.

    python bench/soak.py --minutes 2 --connections 64 [--workers 1] [--url http://host:port --api-key K]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ROSEN = "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)"
# Seconds between /readyz samples: enough points for a 2-minute curve, negligible load.
RSS_SAMPLE_S = 5.0
# Share of gradient requests with a never-seen expression: keeps tracing (the costly, leak-prone
# path) in the mix without turning the soak into a compile benchmark.
FRESH_SHARE = 0.05
MODEL = {
    "input_shape": [4],
    "layers": [{"type": "dense", "units": 16, "activation": "tanh"}, {"type": "dense", "units": 1}],
}
UM_CONFIG = {
    "inputs": [{"name": "x", "size": 3}],
    "outputs": [{"expression": "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)", "size": 1}],
}


@dataclass
class Kind:
    name: str
    path: str
    weight: int
    expected: int  # the status a correct server answers


KINDS = [
    Kind("gradient", "/v1/gradient", 30, 200),
    Kind("hessian", "/v1/gradient", 10, 200),
    Kind("batch_grid", "/v1/gradient", 8, 200),
    Kind("expression_step", "/v1/step", 6, 200),
    Kind("train_step", "/v1/model/train-step", 6, 200),
    Kind("model_gradient", "/v1/model/gradient", 6, 200),
    Kind("umbridge_gradient", "/umbridge/Gradient", 6, 200),
    Kind("umbridge_evaluate", "/umbridge/Evaluate", 6, 200),
    Kind("invalid_parse", "/v1/gradient", 4, 400),
    Kind("invalid_shape", "/v1/gradient", 4, 422),
    Kind("invalid_model", "/v1/model/gradient", 2, 422),
    Kind("invalid_umbridge", "/umbridge/Evaluate", 2, 400),
]


def payload(kind: str, rng: random.Random) -> dict[str, Any]:
    x3 = [rng.uniform(-2, 2) for _ in range(3)]
    if kind == "gradient":
        k = rng.randrange(10**9) if rng.random() < FRESH_SHARE else rng.randrange(4)
        return {"expression": f"sum(sin(x) * x ** 2) + {k}", "variables": {"x": x3}}
    if kind == "hessian":
        return {
            "expression": ROSEN,
            "variables": {"x": x3},
            "derivatives": ["gradient", "hessian"],
            "dtype": "float64",
        }
    if kind == "batch_grid":
        grid = [[a / 4, b / 4] for a in range(-4, 5) for b in range(-4, 5)]
        return {"expression": ROSEN, "variables": {"x": grid}, "batch": True}
    if kind == "expression_step":
        return {
            "expression": ROSEN,
            "variables": {"x": x3},
            "optimizer": {"type": "adam", "learning_rate": 0.01},
            "steps": 5,
        }
    xs = [[rng.uniform(-1, 1) for _ in range(4)] for _ in range(8)]
    ys = [[sum(row)] for row in xs]
    if kind == "train_step":
        return {
            "model": MODEL,
            "x": xs,
            "y": ys,
            "loss": "mse",
            "optimizer": {"type": "sgd", "learning_rate": 0.1},
            "clip": {"global_norm": 1.0},
        }
    if kind == "model_gradient":
        return {"model": MODEL, "x": xs, "y": ys, "loss": "mse"}
    if kind == "umbridge_gradient":
        return {
            "name": "expression",
            "outWrt": 0,
            "inWrt": 0,
            "input": [x3],
            "sens": [1.0],
            "config": UM_CONFIG,
        }
    if kind == "umbridge_evaluate":
        return {"name": "expression", "input": [x3], "config": UM_CONFIG}
    if kind == "invalid_parse":
        return {"expression": "sum(x ** ", "variables": {"x": x3}}
    if kind == "invalid_shape":
        return {"expression": "sum(x + y)", "variables": {"x": x3, "y": [1.0, 2.0]}}
    if kind == "invalid_model":
        return {"model": MODEL, "x": [[1.0, 2.0]], "y": [[1.0]], "loss": "mse"}
    if kind == "invalid_umbridge":
        return {"name": "expression", "input": [[1.0]], "config": UM_CONFIG}
    raise ValueError(kind)


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    rss: list[dict[str, Any]] = field(default_factory=list)


async def client_loop(client: httpx.AsyncClient, stop: float, seed: int, stats: Stats) -> None:
    rng = random.Random(seed)
    weights = [k.weight for k in KINDS]
    while time.monotonic() < stop:
        kind = rng.choices(KINDS, weights)[0]
        body = payload(kind.name, rng)
        started = time.perf_counter()
        try:
            response = await client.post(kind.path, json=body)
            status = response.status_code
        except httpx.HTTPError as error:
            status = -1
            response = None
            detail = f"{type(error).__name__}: {error}"
        elapsed = time.perf_counter() - started
        stats.latencies[kind.name].append(elapsed)
        stats.statuses[kind.name][status] += 1
        if status != kind.expected and len(stats.unexpected) < 50:
            if response is not None:
                detail = response.text[:300]
            stats.unexpected.append({"kind": kind.name, "status": status, "detail": detail})


async def sample_rss(client: httpx.AsyncClient, stop: float, started: float, stats: Stats) -> None:
    while True:
        try:
            pool = (await client.get("/readyz")).json()["pool"]
            stats.rss.append(
                {
                    "t_s": round(time.monotonic() - started, 1),
                    "workers": {
                        str(w["id"]): {
                            "rss_mb": w["rss_mb"],
                            "jobs": w["jobs"],
                            "restarts": w["restarts_by_cause"],
                        }
                        for w in pool["workers"]
                    },
                    "queue_depth": pool["queue_depth"],
                }
            )
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        if time.monotonic() >= stop:
            return
        await asyncio.sleep(min(RSS_SAMPLE_S, max(0.0, stop - time.monotonic())))


async def soak(url: str, api_key: str | None, minutes: float, connections: int) -> Stats:
    stats = Stats()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=120.0) as client:
        started = time.monotonic()
        stop = started + minutes * 60.0
        sampler = asyncio.create_task(sample_rss(client, stop, started, stats))
        await asyncio.gather(*(client_loop(client, stop, seed, stats) for seed in range(connections)))
        await sampler
    return stats


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0


def report(stats: Stats, args: argparse.Namespace, wall_s: float) -> dict[str, Any]:
    kinds = {}
    for kind in KINDS:
        lat = stats.latencies.get(kind.name, [])
        if not lat:
            continue
        kinds[kind.name] = {
            "requests": len(lat),
            "expected_status": kind.expected,
            "statuses": {str(k): v for k, v in sorted(stats.statuses[kind.name].items())},
            "unexpected": sum(v for k, v in stats.statuses[kind.name].items() if k != kind.expected),
            "p50_ms": round(pct(lat, 0.50), 1),
            "p99_ms": round(pct(lat, 0.99), 1),
            "mean_ms": round(statistics.fmean(lat) * 1000.0, 1),
        }
    total = sum(k["requests"] for k in kinds.values())
    unexpected = sum(k["unexpected"] for k in kinds.values())
    rss_by_worker: dict[str, list[float]] = defaultdict(list)
    for sample in stats.rss:
        for wid, w in sample["workers"].items():
            if w["rss_mb"] is not None:
                rss_by_worker[wid].append(w["rss_mb"])
    last = stats.rss[-1]["workers"] if stats.rss else {}
    return {
        "minutes": args.minutes,
        "connections": args.connections,
        "workers": args.workers,
        "wall_s": round(wall_s, 1),
        "requests": total,
        "throughput_rps": round(total / wall_s, 1),
        "unexpected": unexpected,
        "unexpected_examples": stats.unexpected[:10],
        "kinds": kinds,
        "rss_mb": {
            wid: {"first": v[0], "max": max(v), "last": v[-1], "samples": len(v)}
            for wid, v in rss_by_worker.items()
        },
        "restarts": {wid: w["restarts"] for wid, w in last.items()},
        "rss_timeline": stats.rss,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\nsoak: {result['connections']} connections, {result['minutes']} min, "
        f"{result['workers']} worker(s); "
        f"{result['requests']} requests, {result['throughput_rps']} req/s, "
        f"unexpected: {result['unexpected']}\n"
    )
    head = ("kind", "requests", "statuses", "unexpected", "p50 ms", "p99 ms")
    print(f"| {head[0]:<18} | {head[1]:>8} | {head[2]:<14} | {head[3]:>10} | {head[4]:>8} | {head[5]:>8} |")
    print(f"|{'-' * 20}|{'-' * 9}:|{'-' * 16}|{'-' * 11}:|{'-' * 9}:|{'-' * 9}:|")
    for name, k in result["kinds"].items():
        statuses = " ".join(f"{s}x{n}" for s, n in k["statuses"].items())
        print(
            f"| {name:<18} | {k['requests']:>8} | {statuses:<14} | {k['unexpected']:>10} | "
            f"{k['p50_ms']:>8.1f} | {k['p99_ms']:>8.1f} |"
        )
    print()
    for wid, rss in result["rss_mb"].items():
        timeline = " ".join(
            f"{s['workers'][wid]['rss_mb']:.0f}"
            for s in result["rss_timeline"]
            if wid in s["workers"] and s["workers"][wid]["rss_mb"] is not None
        )
        print(
            f"worker {wid} RSS MiB: first {rss['first']:.0f}, max {rss['max']:.0f}, last {rss['last']:.0f}; "
            f"restarts {result['restarts'].get(wid)}"
        )
        print(f"  every {RSS_SAMPLE_S:g} s: {timeline}")
    for example in result["unexpected_examples"]:
        print(f"unexpected: {example}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(workers: int, api_key: str, log_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "TAPESERVE_WORKERS": str(workers),
        "TAPESERVE_API_KEYS": api_key,
        "TAPESERVE_LOG_LEVEL": "warning",
    }
    log = (log_dir / "soak-server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("no worker became ready within 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "2")))
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--url", help="soak a running server instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("TAPESERVE_API_KEY"))
    args = parser.parse_args()
    proc = None
    api_key = args.api_key
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            url = args.url
        else:
            api_key = api_key or "soak-key"
            proc, url = start_server(args.workers, api_key, Path(tmp))
        try:
            started = time.monotonic()
            stats = asyncio.run(soak(url, api_key, args.minutes, args.connections))
            result = report(stats, args, time.monotonic() - started)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    print_table(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'soak.json'}")
    if result["unexpected"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
