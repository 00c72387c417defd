"""`make bench-api`: the API process's own work stays bounded under the costliest bodies the limits allow.

Starts one tapeserve server (1 worker, default limits) and measures, in one run:

1. /healthz latency from one keep-alive client polling sequentially, first quiet, then while a
   second client (a process of its own) loops over the costliest bodies the default limits allow,
   each distinct so no cache helps:
   - ``program``: a gradient request whose texts are ~100,000 characters (the program limit) of
     valid functions and expression, checked in full before its tensors are read;
   - ``json_body``: a ~15.6 MB body (the limit is 16 MiB) of 1.04M JSON numbers, parsed and decoded
     in a thread;
   - ``umbridge_config``: a UM-Bridge /InputSizes whose generic config carries ~100,000 characters
     of expression and functions.
   Target (issue 17): /healthz p99 under 50 ms while the loop runs.
2. The API process's RSS (VmRSS of the server's main pid, which is the API process; workers are its
   children) while 10,000 requests with distinct 64-character names and distinct UM-Bridge configs
   go through the checks and into the caches. Target: flat within the caches' byte bounds (16 MiB
   of program text, 16 MiB of configs, 4 MiB of batching signatures).

Prints a table and writes bench/results/api_bounds.json. Nothing here is a pass/fail test.

    python bench/api_bounds.py [--quiet-s 10] [--hostile-s 30] [--distinct 10000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/api_bounds.py` from the root

from bench.run import RESULTS, free_port, summary

ROOT = Path(__file__).resolve().parent.parent
HTTP_TIMEOUT_S = 120.0
TARGET_HEALTHZ_P99_MS = 50.0


@contextlib.contextmanager
def tapeserve_server() -> Iterator[tuple[str, int]]:
    """A default-limits server with one worker; yields its URL and the API process's pid."""
    port = free_port()
    argv = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "TAPESERVE_WORKERS": "1"}
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.25)
        else:
            raise RuntimeError("the server did not become ready")
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- the costliest bodies ---------------------------------------------------------------------------


def _terms(chars: int, var: str, salt: int) -> str:
    """Valid expression text of about ``chars`` characters, distinct per ``salt``."""
    terms: list[str] = []
    size = 0
    i = 0
    while size < chars:
        term = f"sin({var} * {salt}.{i})"
        terms.append(term)
        size += len(term) + 3
        i += 1
    return " + ".join(terms)


def program_body(salt: int) -> dict[str, Any]:
    # 4 functions of ~19,000 characters and an expression of ~19,000: ~95,000 of the 100,000 allowed,
    # each text under the 20,000 per-text limit and the 10,000-node limit.
    functions = {f"f{k}": {"params": ["a"], "body": _terms(18_000, "a", salt * 10 + k)} for k in range(4)}
    expression = "f0(x) + f1(x) + f2(x) + f3(x) + " + _terms(18_000, "x", salt)
    return {"expression": expression, "functions": functions, "variables": {"x": [0.5, 1.5]}}


def json_body(salt: int) -> bytes:
    # ~15.6 MB of JSON numbers (the body limit is 16 MiB), 1.04M elements: parsed and decoded in a thread.
    n = 1_040_000
    numbers = ",".join(f"{(i * 7 + salt) % 1000 / 997:.12f}" for i in range(n))
    return f'{{"expression":"sum(x)","variables":{{"x":[{numbers}]}}}}'.encode()


def umbridge_config(salt: int, chars: int = 95_000) -> dict[str, Any]:
    functions = {f"g{k}": {"params": ["a"], "body": _terms(chars // 5, "a", salt * 10 + k)} for k in range(4)}
    expression = "sum(g0(x) + g1(x) + g2(x) + g3(x)) + sum(" + _terms(chars // 5, "x", salt) + ")"
    return {"inputs": [{"name": "x", "size": 2}], "outputs": [{"expression": expression, "size": 1}],
            "functions": functions}  # fmt: skip


_CTX = multiprocessing.get_context("spawn")


KINDS = ("program", "json_body", "umbridge_config")


class Hostile(_CTX.Process):  # type: ignore[name-defined,misc]
    """Loops over the costliest bodies until told to stop; reports answers by kind and status."""

    def __init__(self, url: str, max_seconds: float, kinds: tuple[str, ...] = KINDS) -> None:
        super().__init__(daemon=True)
        self.url, self.max_seconds, self.kinds = url, max_seconds, kinds
        self.stop = _CTX.Event()
        self.sending = _CTX.Event()
        self._out = _CTX.Queue()

    def run(self) -> None:
        # Bodies are encoded ahead (a few per kind, cycled with a fresh salt in the text): the
        # client's own JSON work stays small, and every request is still new to the server's caches.
        headers = {"content-type": "application/json"}
        counts: Counter[str] = Counter()
        sent, start, salt = 0, time.monotonic(), 1000
        heavy = [json_body(s) for s in range(3)]
        with httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT_S) as client:
            while not self.stop.is_set() and time.monotonic() - start < self.max_seconds:
                kind = self.kinds[sent % len(self.kinds)]
                salt += 1
                try:
                    if kind == "program":
                        r = client.post("/v1/gradient", json=program_body(salt))
                    elif kind == "json_body":
                        # A distinct body each time: the first number changes.
                        content = heavy[sent % 3].replace(b"[0", f"[{salt % 9}".encode(), 1)
                        r = client.post("/v1/gradient", content=content, headers=headers)
                    else:
                        body = {"name": "expression", "config": umbridge_config(salt)}
                        r = client.post("/umbridge/InputSizes", json=body)
                    counts[f"{kind} {r.status_code}"] += 1
                except httpx.HTTPError as e:
                    counts[f"{kind} error {type(e).__name__}"] += 1
                sent += 1
                self.sending.set()
        self._out.put((dict(counts), sent, time.monotonic() - start))

    def collect(self, timeout_s: float) -> tuple[dict[str, int], int, float]:
        result: tuple[dict[str, int], int, float] = self._out.get(timeout=timeout_s)
        self.join(timeout=timeout_s)
        return result


def poll_healthz(url: str, seconds: float) -> list[float]:
    samples: list[float] = []
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as client:
        for _ in range(20):
            client.get("/healthz")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            client.get("/healthz").raise_for_status()
            samples.append((time.perf_counter() - t0) * 1000.0)
            time.sleep(0.005)  # ~150 polls a second: the probe must not be the load
    return samples


def distinct_requests(url: str, pid: int, total: int) -> list[dict[str, Any]]:
    """``total`` requests with distinct 64-character names and configs; the API's RSS along the way."""
    marks = sorted({0, 1000, total // 4, total // 2, 3 * total // 4, total})
    points = [{"requests": 0, "rss_mb": round(rss_mb(pid), 1)}]
    statuses: Counter[int] = Counter()
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as client:
        for i in range(1, total + 1):
            name = f"v{i:08d}".ljust(64, "q")  # the longest name allowed, distinct per request
            if i % 2:
                # A distinct program that passes the check (and is cached), then a ragged tensor is
                # refused while decoding: the API does all its work, no worker is needed.
                body = {"expression": f"sum({name} ** 2) + {i}", "variables": {name: [[1.0], [1.0, 2.0]]}}
                r = client.post("/v1/gradient", json=body)
            else:
                config = umbridge_config(i, chars=2_000)
                config["inputs"][0]["name"] = "x"
                extra = {f"{name[:60]}{k:04d}": {"params": ["a"], "body": f"a * {i}.{k}"} for k in range(8)}
                config["functions"].update(extra)  # distinct 64-character names, kept with the config
                r = client.post("/umbridge/InputSizes", json={"name": "expression", "config": config})
            statuses[r.status_code] += 1
            if i in marks:
                points.append({"requests": i, "rss_mb": round(rss_mb(pid), 1), "statuses": dict(statuses)})
    return points


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quiet-s", type=float, default=10.0)
    parser.add_argument("--hostile-s", type=float, default=30.0)
    parser.add_argument("--distinct", type=int, default=10_000)
    parser.add_argument("--kinds", default=",".join(KINDS), help="the hostile loop's kinds")
    args = parser.parse_args()
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    with tapeserve_server() as (url, pid):
        quiet = summary(poll_healthz(url, args.quiet_s))
        hostile = Hostile(url, max_seconds=args.hostile_s + 120, kinds=tuple(args.kinds.split(",")))
        hostile.start()
        hostile.sending.wait(timeout=300)
        loaded = poll_healthz(url, args.hostile_s)
        hostile.stop.set()
        counts, sent, seconds = hostile.collect(timeout_s=300)
        out["healthz_quiet"] = quiet
        out["healthz_hostile"] = {**summary(loaded), "max_ms": max(loaded)}
        out["hostile"] = {"sent": sent, "seconds": round(seconds, 1), "answers": counts}
        out["healthz_p99_target_ms"] = TARGET_HEALTHZ_P99_MS
        out["rss"] = distinct_requests(url, pid, args.distinct)
    q, h = out["healthz_quiet"], out["healthz_hostile"]
    print(f"/healthz quiet:   p50 {q['p50_ms']:.2f} ms  p99 {q['p99_ms']:.2f} ms  (n={q['n']})")
    print(f"/healthz hostile: p50 {h['p50_ms']:.2f} ms  p99 {h['p99_ms']:.2f} ms  max {h['max_ms']:.1f} ms "
          f"(n={h['n']}; target p99 < {TARGET_HEALTHZ_P99_MS:.0f} ms)")  # fmt: skip
    print(f"hostile client: {sent} requests in {seconds:.1f} s: {json.dumps(counts, sort_keys=True)}")
    print("API RSS after distinct requests:")
    for point in out["rss"]:
        print(f"  {point['requests']:>6}  {point['rss_mb']:8.1f} MiB  {point.get('statuses', '')}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "api_bounds.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
