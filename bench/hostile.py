"""`make bench-hostile`: what a hostile client costs an ordinary one, measured in one run.

Starts one tapeserve server (1 worker by default, a 1500 MiB memory ceiling, a 5 s kill budget and
tensor limits high enough that a memory-hungry program meets the ceiling, not the element limits),
then measures N sequential warm rosen10 gradients from one keep-alive httpx client twice:

- quiet: nothing else runs;
- hostile: a second client loops, until the ordinary client is done, over the issue's workload:
  deadlines below the 0.1 s floor (``timeout_s: 0.001``, 422) and a few poison programs that cross
  the memory ceiling (422 memory_limit the first time, 422 quarantined after). ``--kinds`` adds
  ``slow``: 0.1 s deadlines on a 2000x2000 float64 matmul (504; the job goes on in its worker and
  holds it, the attacker's share of a worker that no scheduler can take back mid-op).

In both phases a third thread polls /readyz every ~50 ms for the workers' RSS and reads VmHWM from
/proc/PID/status of every worker pid seen. Prints a table and writes bench/results/hostile.json
(other options add a suffix: hostile-workers2.json, hostile-poison.json, ...). Nothing here is a
pass/fail test.

    python bench/hostile.py [-n 300] [--workers 1] [--kinds tiny_timeout,poison,slow] [--slow-size 2000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/hostile.py` from the root

from bench.run import RESULTS, ROSEN, X10, machine, server, summary, tapeserve, timed

CEILING_MB = 1500
KILL_AFTER_S = 5
GRAD = {"expression": ROSEN, "variables": {"x": X10}, "dtype": "float64"}
KINDS = ("tiny_timeout", "slow", "poison")
DEFAULT_KINDS = ("tiny_timeout", "poison")  # the hostile client
# A float64 SIZE x SIZE matmul (forward, and two more in the backward pass) on a scalar x. At 3000 it
# took ~5.0-5.2 s alone on a 2-core test machine: past the 5 s kill budget, so the worker was killed
# and the program quarantined. At 2000 (~8/27 of the work, ~1.5 s) it finishes within the budget and
# goes on in its worker after its 504, the case this benchmark is after.
SLOW_SIZE = 2000


def slow_body(size: int) -> dict[str, Any]:
    m = f"reshape(sin(arange({size * size}) * x), ({size}, {size}))"
    return {
        "expression": f"sum(matmul({m}, {m}))",
        "variables": {"x": 0.5},
        "dtype": "float64",
        "timeout_s": 0.1,
    }


# 20,000 x 20,000 float64 is 3.2 GB: past the ceiling (400M elements passes the element limit).
POISON_X = [1e-4 * i for i in range(20_000)]
POISON_PROGRAMS = 3  # distinct poison programs the hostile client cycles over (a loop of the same few)
PHASE_LIMIT_S = 240.0  # the hostile phase's ordinary requests stop here, done or not
HOSTILE_MAX_REQUESTS = 5000
HTTP_TIMEOUT_S = 60.0


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


class Poller(threading.Thread):
    """Polls /readyz for every worker's RSS and /proc/PID/status for every worker pid seen."""

    def __init__(self, url: str, interval_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.url, self.interval_s = url, interval_s
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.max_rss_mb: float | None = None
            self.polls = 0
            self.pids: set[int] = set()
            self.hwm_mb: dict[int, float] = {}  # pid -> the largest VmHWM read while it lived

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while not self.stop.is_set():
                try:
                    workers = client.get("/readyz").json()["pool"]["workers"]
                except (httpx.HTTPError, ValueError, KeyError):
                    workers = []
                with self.lock:
                    self.polls += 1
                    for w in workers:
                        if w.get("pid"):
                            self.pids.add(int(w["pid"]))
                        if w.get("rss_mb") is not None:
                            self.max_rss_mb = max(self.max_rss_mb or 0.0, float(w["rss_mb"]))
                    for pid in self.pids:
                        hwm = vm_hwm_mb(pid)
                        if hwm is not None:
                            self.hwm_mb[pid] = max(self.hwm_mb.get(pid, 0.0), hwm)
                self.stop.wait(self.interval_s)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "max_readyz_rss_mb": self.max_rss_mb,
                "max_vm_hwm_mb": max(self.hwm_mb.values(), default=None),
                "vm_hwm_mb_by_pid": {str(pid): round(v, 1) for pid, v in sorted(self.hwm_mb.items())},
                "worker_pids_seen": sorted(self.pids),
                "readyz_polls": self.polls,
            }


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set size since the process started (kB in /proc/PID/status), in MiB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def restarts_by_cause(client: httpx.Client) -> dict[str, int]:
    out: Counter[str] = Counter()
    for w in client.get("/readyz").json()["pool"]["workers"]:
        out.update(w.get("restarts_by_cause", {}))
    return dict(out)


# The hostile client is a process of its own: as a thread it would share this process's GIL with
# the ordinary client, and the ordinary timings would measure the benchmark, not the server.
_CTX = multiprocessing.get_context("spawn")


class Hostile(_CTX.Process):  # type: ignore[name-defined,misc]
    """Loops over the hostile mix until told to stop (or its request count or time runs out)."""

    def __init__(self, url: str, max_seconds: float, kinds: list[str], slow_size: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_seconds, self.kinds = url, max_seconds, kinds
        self.stop = _CTX.Event()
        self.sending = _CTX.Event()  # set once its first answer came back: the phase may begin
        self._out = _CTX.Queue()
        self.by_kind: dict[str, Counter[str]] = {k: Counter() for k in kinds}
        self.sent = 0
        self.seconds = 0.0
        self.tiny = encode({**GRAD, "timeout_s": 0.001})
        self.slow = encode(slow_body(slow_size))
        self.poisons: dict[int, bytes] = {}

    def poison(self, k: int) -> bytes:
        if k not in self.poisons:  # encoded once: the client's JSON work stays out of the measurement
            body = {"expression": f"sum(x[:, None] * x[None, :]) + 0*{k}", "variables": {"x": POISON_X},
                    "dtype": "float64"}  # fmt: skip
            self.poisons[k] = encode(body)
        return self.poisons[k]

    def run(self) -> None:
        start = time.monotonic()
        headers = {"content-type": "application/json"}
        poisons_sent = 0
        with httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT_S) as client:
            for i in range(HOSTILE_MAX_REQUESTS):
                if self.stop.is_set() or time.monotonic() - start > self.max_seconds:
                    break
                kind = self.kinds[i % len(self.kinds)]
                if kind == "poison":
                    content = self.poison(poisons_sent % POISON_PROGRAMS)
                    poisons_sent += 1
                else:
                    content = self.tiny if kind == "tiny_timeout" else self.slow
                try:
                    r = client.post("/v1/gradient", content=content, headers=headers)
                    key = f"{r.status_code} {code_of(r)}"
                except httpx.HTTPError as e:
                    key = f"error {type(e).__name__}"
                self.by_kind[kind][key] += 1
                self.sent += 1
                self.sending.set()
        self.seconds = time.monotonic() - start
        self._out.put((self.by_kind, self.sent, self.seconds))

    def collect(self, timeout_s: float) -> None:
        """After ``stop``: the counts the child gathered (it sends them as it ends)."""
        self.by_kind, self.sent, self.seconds = self._out.get(timeout=timeout_s)
        self.join(timeout=timeout_s)

    def counts(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for c in self.by_kind.values():
            total.update(c)
        return dict(sorted(total.items()))


def code_of(r: httpx.Response) -> str:
    if r.status_code == 200:
        return "ok"
    try:
        body = r.json()
    except ValueError:
        return "?"
    code = str(body.get("code", "?"))
    if r.status_code == 504:
        code += " (continues)" if body.get("continues") else " (never ran)"
    return code


def unexpected_5xx(counts: dict[str, int]) -> dict[str, int]:
    return {k: n for k, n in counts.items() if k.startswith("5") and not k.startswith("504 ")}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=300, help="ordinary requests per phase")
    parser.add_argument("--workers", type=int, default=1, help="TAPESERVE_WORKERS (default 1)")
    parser.add_argument(
        "--kinds",
        default=",".join(DEFAULT_KINDS),
        help=f"hostile requests to cycle over, from {','.join(KINDS)} (default {','.join(DEFAULT_KINDS)})",
    )
    parser.add_argument("--slow-size", type=int, default=SLOW_SIZE, help="side of the slow program's matmul")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or any(k not in KINDS for k in kinds):
        parser.error(f"--kinds: a comma-separated subset of {','.join(KINDS)}")

    argv, port, env = tapeserve(
        {
            "TAPESERVE_WORKERS": str(args.workers),
            "TAPESERVE_WORKER_MEMORY_MB": str(CEILING_MB),
            "TAPESERVE_WORKER_KILL_AFTER_S": str(KILL_AFTER_S),
            "TAPESERVE_MAX_TENSOR_ELEMENTS": "400000000",
        }
    )
    results: dict[str, Any] = {
        **machine(),
        "config": {
            "workers": args.workers,
            "n": args.n,
            "memory_ceiling_mb": CEILING_MB,
            "kill_after_s": KILL_AFTER_S,
            "max_tensor_elements": 400_000_000,
            "hostile_kinds": kinds,
            "slow_matmul_size": args.slow_size,
        },
    }
    ordinary_body = encode(GRAD)
    headers = {"content-type": "application/json"}
    started = time.monotonic()
    with (
        server(argv, port, "/readyz", env) as url,
        httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as client,
    ):
        ordinary_statuses: Counter[str] = Counter()

        def ordinary() -> None:
            r = client.post("/v1/gradient", content=ordinary_body, headers=headers)
            ordinary_statuses[f"{r.status_code} {code_of(r)}"] += 1

        poller = Poller(url)
        poller.start()
        try:
            # Quiet phase (the poller runs in both phases, so both pay for it alike).
            quiet = summary(timed(ordinary, args.n, warmup=20))
            quiet_rss = poller.snapshot()
            quiet_statuses = dict(ordinary_statuses)
            ordinary_statuses.clear()
            before = restarts_by_cause(client)

            # Hostile phase: the hostile client starts first and stops when the ordinary one is done.
            poller.reset()
            hostile = Hostile(url, PHASE_LIMIT_S + 30, kinds, args.slow_size)
            hostile.start()
            if not hostile.sending.wait(60):
                raise RuntimeError("the hostile client never got an answer")
            samples: list[float] = []
            phase_start = time.monotonic()
            for _ in range(args.n):
                if time.monotonic() - phase_start > PHASE_LIMIT_S:
                    break
                t0 = time.perf_counter()
                try:
                    ordinary()
                except httpx.HTTPError as e:
                    ordinary_statuses[f"error {type(e).__name__}"] += 1
                samples.append((time.perf_counter() - t0) * 1000.0)
            phase_s = time.monotonic() - phase_start
            hostile.stop.set()
            hostile.collect(HTTP_TIMEOUT_S + 5)
            hostile_rss = poller.snapshot()
            time.sleep(0.5)  # let a replacement that the last hostile request caused show up in /readyz
            after = restarts_by_cause(client)
        finally:
            poller.stop.set()
            poller.join(timeout=10)

    hostile_summary = summary(samples)
    counts = hostile.counts()
    results["quiet"] = {**quiet, "ordinary_statuses": quiet_statuses, "worker_memory": quiet_rss}
    results["hostile"] = {
        **hostile_summary,
        "seconds": phase_s,
        "ordinary_statuses": dict(ordinary_statuses),
        "hostile_requests": hostile.sent,
        "hostile_seconds": hostile.seconds,
        "hostile_counts": counts,
        "hostile_counts_by_kind": {k: dict(sorted(v.items())) for k, v in hostile.by_kind.items()},
        "hostile_unexpected_5xx": unexpected_5xx(counts),
        "hostile_client_errors": {k: n for k, n in counts.items() if k.startswith("error")},
        "worker_memory": hostile_rss,
        "restarts_by_cause_before": before,
        "restarts_by_cause_after": after,
        "restarts_by_cause_during": {c: after.get(c, 0) - before.get(c, 0) for c in after},
    }
    ratio = hostile_summary["p50_ms"] / quiet["p50_ms"]
    results["ratio_hostile_p50_over_quiet_p50"] = ratio
    results["ratio_target"] = 1.5
    results["seconds_total"] = time.monotonic() - started

    def mb(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0f}"

    h = results["hostile"]
    print(f"machine: {results['machine']}, {results['when']}")
    print(
        f"workers={args.workers}, n={args.n}, hostile kinds={','.join(kinds)}, slow matmul {args.slow_size}^2"
    )
    print(f"{'phase':<10} {'p50 ms':>9} {'p99 ms':>9} {'n':>5} {'peak RSS (readyz)':>18} {'peak VmHWM':>11}")
    for name, row in (("quiet", results["quiet"]), ("hostile", h)):
        memory = row["worker_memory"]
        print(f"{name:<10} {row['p50_ms']:>9.3f} {row['p99_ms']:>9.3f} {row['n']:>5} "
              f"{mb(memory['max_readyz_rss_mb']):>14} MiB {mb(memory['max_vm_hwm_mb']):>7} MiB")  # fmt: skip
    verdict = "met" if ratio <= 1.5 else "MISSED"
    print(f"hostile p50 / quiet p50: {ratio:.2f} (target <= 1.5: {verdict})")
    print(f"worker memory ceiling: {CEILING_MB} MiB; worker pids seen in the hostile phase: "
          f"{len(h['worker_memory']['worker_pids_seen'])}")  # fmt: skip
    print(f"ordinary statuses: quiet {quiet_statuses}, hostile {dict(ordinary_statuses)}")
    print(f"hostile client: {hostile.sent} requests in {hostile.seconds:.1f} s "
          f"(ordinary phase {phase_s:.1f} s)")  # fmt: skip
    for kind, c in h["hostile_counts_by_kind"].items():
        print(f"  {kind:<13} {c}")
    print(f"  5xx other than 504: {h['hostile_unexpected_5xx'] or 'none'}; "
          f"client-side errors: {h['hostile_client_errors'] or 'none'}")  # fmt: skip
    print(f"worker restarts by cause: before {before}, after {after}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "hostile"
    name += f"-workers{args.workers}" if args.workers != 1 else ""
    name += f"-{'+'.join(kinds)}" if tuple(kinds) != DEFAULT_KINDS else ""
    name += f"-slow{args.slow_size}" if args.slow_size != SLOW_SIZE and "slow" in kinds else ""
    name += ".json"
    (RESULTS / name).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS / name} ({results['seconds_total']:.0f} s)")


if __name__ == "__main__":
    main()
