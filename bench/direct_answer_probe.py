"""An experiment, not the service: would the worker writing the HTTP answer itself make the hop cheap?

Issue 21 asks for a warm gradient p50 within 1.2x httpstan's. With every process in real time (no
one waits for a core) tapeserve stays at ~1.35x: per request the API runs ~600 us of CPU and the
worker ~260 us, against httpstan's one process at ~500 us (docs/performance.md). The redesign that
trace suggested: the worker writes the answer straight to the client's socket, so the API's second
wake-up, its decoding, rendering and writing leave the critical path. Before anyone builds it, this
prototype measures what it would buy.

Two tapeserve servers run side by side, one worker each, the same code except:

- ``plain``: the service as shipped;
- ``direct``: before a gradient job goes to the worker, the API puts (its pid, the client socket's
  descriptor) in a 16-byte shared page; the worker takes a copy of the socket (``pidfd_getfd``),
  renders the JSON answer and its headers, writes them and closes the copy, then replies as usual.
  The API then skips rendering and answers into a transport that writes nothing, so uvicorn's
  bookkeeping (keep-alive, the access line, metrics) runs as before.

The prototype is only right for what it measures: one keep-alive client sending one request at a
time (one shared page per server), no deadline racing the worker's write, no CORS or rate-limit
headers. Building it for real needs ``SCM_RIGHTS`` (``pidfd_getfd`` needs ptrace rights: root here,
refused by default container profiles), a claim the API and the worker can race for (a deadline
against a late answer), the rendering moved out of service/api, and a uvicorn protocol that knows
a response was written for it.

    .venv/bin/python bench/direct_answer_probe.py [--hogs 2] [--realtime 10] [-n 1000] [--rounds 3]

Linux only, as root (``pidfd_getfd``; ``--realtime`` also needs CAP_SYS_NICE). httpstan from
bench/.peers (``make bench/.peers/bin/python``) is measured in the same rounds when present.
Results: bench/results/direct-answer-probe[-hogsN][-rtN].json. Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/...` puts bench/, not the repository, on the path
    sys.path.insert(0, str(ROOT))

_MODE = os.environ.get("PROBE_MODE", "")  # set for the servers this script starts: "plain" or "direct"
_SHARED = os.environ.get("PROBE_SHARED", "")  # the direct server's shared page (a file in /dev/shm)
_NR_PIDFD_GETFD = 438  # x86-64 and arm64


def _page() -> mmap.mmap:
    with open(_SHARED, "r+b") as file:
        return mmap.mmap(file.fileno(), 16)


def _patch_worker() -> None:
    """In the worker: answer gradient jobs on the client's socket, then reply to the pool as usual."""
    import orjson

    from service.workers import child, transport

    page = _page()
    libc = ctypes.CDLL(None, use_errno=True)
    pidfds: dict[int, int] = {}
    original = child._run_one

    def run_one(handler: Any, job_id: int, job: Any, settings: Any) -> transport.Frames:
        pid, fd = struct.unpack("qq", page[:16])
        if pid == 0 or type(job).__name__ != "GradientJob":
            return original(handler, job_id, job, settings)
        started = time.perf_counter()
        result = handler(job, settings.limits)
        body = orjson.dumps(
            {
                "value": float(result.value),
                "gradient": {name: g.tolist() for name, g in result.gradient.items()},
                "dtype": job.dtype,
                "meta": {
                    "cache": result.cache,
                    "compute_ms": round(result.compute_ms, 3),
                    "total_ms": round((time.perf_counter() - started) * 1000.0, 3),
                    "executor": result.executor,
                },
            }
        )
        head = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"x-request-id: %s\r\n\r\n" % (len(body), os.urandom(16).hex().encode())
        )
        if pid not in pidfds:
            pidfds[pid] = os.pidfd_open(pid)
        sock = libc.syscall(_NR_PIDFD_GETFD, pidfds[pid], fd, 0)
        if sock < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        try:
            os.write(sock, head + body)
        finally:
            os.close(sock)
        return transport.encode(("result", job_id, result, child.read_rss_mb()))

    child._run_one = run_one


class _Silent:
    """A transport that writes nothing (the worker has answered) and closes the real one."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.real.close()

    def is_closing(self) -> bool:
        return bool(self.real.is_closing())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.real.get_extra_info(name, default)


def _patch_api() -> None:
    """In the API: hand the socket over for gradient jobs, and skip rendering their answers."""
    import contextvars

    import uvicorn.protocols.http.httptools_impl as httptools_impl

    from service.api import endpoints

    page = _page()
    cycle_var: contextvars.ContextVar[Any] = contextvars.ContextVar("cycle")
    run_asgi = httptools_impl.RequestResponseCycle.run_asgi

    async def run_asgi_noting_cycle(self: Any, app: Any) -> None:
        cycle_var.set(self)
        await run_asgi(self, app)

    httptools_impl.RequestResponseCycle.run_asgi = run_asgi_noting_cycle  # type: ignore[method-assign]
    serve = endpoints.serve

    async def serve_direct(endpoint: Any, body: Any, state: Any) -> Any:
        if not endpoint.batched:
            return await serve(endpoint, body, state)
        cycle = cycle_var.get()
        job = endpoint.build(body, state.settings.limits())
        page[:16] = struct.pack("qq", os.getpid(), cycle.transport.get_extra_info("socket").fileno())
        cycle.transport = _Silent(cycle.transport)
        await state.batcher.run(job, timeout_s=state.settings.request_timeout_s, affinity=job.signature())
        return {}

    endpoints.serve = serve_direct


if _MODE == "direct" and _SHARED and __name__ != "__main__":
    _patch_worker()  # a spawned worker imports this file as __mp_main__


def _serve(port: int) -> None:
    if _MODE == "direct":
        _patch_api()
    from service.cli import main

    sys.exit(main(["serve", "--port", str(port)]))


def _measure(args: argparse.Namespace) -> None:
    import httpx
    import numpy as np

    from bench import run as bench
    from examples.whole_runs import rosen_gradient

    if args.realtime:
        bench.REALTIME = args.realtime
        os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(args.realtime))
    shared = Path(f"/dev/shm/tapeserve-probe-{os.getpid()}")
    shared.write_bytes(b"\0" * 16)
    grad = {"expression": bench.ROSEN, "variables": {"x": bench.X10}, "dtype": "float64"}
    env = {"TAPESERVE_WORKERS": "1", "PROBE_SHARED": str(shared)}
    if args.realtime:
        env["TAPESERVE_REALTIME_PRIORITY"] = str(args.realtime)
    rows: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(bench.cpu_hogs(args.hogs))
        clients: dict[str, tuple[httpx.Client, str, dict[str, Any]]] = {}
        for mode in ("plain", "direct"):
            port = bench.free_port()
            argv = [sys.executable, str(Path(__file__).resolve()), "--serve", str(port)]
            url = stack.enter_context(bench.server(argv, port, "/readyz", {**env, "PROBE_MODE": mode}))
            client = stack.enter_context(httpx.Client(base_url=url, timeout=60))
            clients[f"tapeserve {mode}"] = (client, "/v1/gradient", grad)
        if bench.PEERS.exists():
            port = bench.free_port()
            url = stack.enter_context(
                bench.server([str(bench.PEERS), "-m", "httpstan", "--port", str(port)], port, "/v1/health")
            )
            client = stack.enter_context(httpx.Client(base_url=url, timeout=600))
            model = client.post("/v1/models", json={"program_code": bench.STAN_ROSEN}).json()
            body = {"data": {}, "unconstrained_parameters": bench.X10, "adjust_transform": False}
            clients["httpstan"] = (client, f"/v1/{model['name']}/log_prob_grad", body)
        expected = rosen_gradient(np.asarray(bench.X10))
        # Every server answers right, against the closed form, before anything is timed.
        for name, (client, path, body) in clients.items():
            answer = client.post(path, json=body).raise_for_status().json()
            got = answer["gradient"]["x"] if "gradient" in answer else -np.asarray(answer["log_prob_grad"])
            np.testing.assert_allclose(got, expected, rtol=1e-12, err_msg=name)
        for _ in range(args.rounds):
            for name, (client, path, body) in clients.items():
                call = lambda c=client, p=path, b=body: c.post(p, json=b).raise_for_status()  # noqa: E731
                rows.setdefault(name, []).extend(bench.timed(call, args.n))
    shared.unlink()
    results: dict[str, Any] = {
        **bench.machine(),
        "hogs": args.hogs,
        "realtime": args.realtime,
        "rounds": args.rounds,
        "workloads": {f"{name} rosen10 gradient, sequential": bench.summary(s) for name, s in rows.items()},
    }
    stan = results["workloads"].get("httpstan rosen10 gradient, sequential")
    for name, row in results["workloads"].items():
        ratio = f"  {row['p50_ms'] / stan['p50_ms']:.2f}x httpstan's p50" if stan else ""
        print(f"{name:45s} p50 {row['p50_ms']:.3f}  p99 {row['p99_ms']:.3f} ms{ratio}")
    suffix = (f"-hogs{args.hogs}" if args.hogs else "") + (f"-rt{args.realtime}" if args.realtime else "")
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    (bench.RESULTS / f"direct-answer-probe{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # a server of this experiment
    parser.add_argument("-n", type=int, default=1000, help="sequential requests per server and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each server in turn")
    parser.add_argument("--hogs", type=int, default=0, help="busy loops running beside the whole probe")
    parser.add_argument("--realtime", type=int, default=0, help="SCHED_RR priority of servers and client")
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve)
    else:
        _measure(args)


if __name__ == "__main__":
    main()
