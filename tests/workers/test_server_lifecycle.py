"""The pool as a client of a real `tapeserve serve` sees it: crashes, deadlines, SIGTERM, hard kills."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, start_server, stop_server

# A float64 matmul of 3000x3000 (9M elements, under the 10M limit) and its gradient: ~2 s of real work
# on an idle 2-core machine. M depends on x, so Grappler cannot fold the work into a constant.
M = "reshape(sin(arange(9000000) * x), (3000, 3000))"


def matmuls(n: int) -> str:
    return "sum(" + "matmul(" * n + M + f", {M})" * n + ")"


SLOW = matmuls(8)  # ~18 s idle: far longer than any deadline or wait below
BUSY = matmuls(1)  # ~2 s idle: long enough to be seen running


def worker_busy(server: LiveServer) -> bool:
    status = httpx.get(f"{server.url}/readyz", timeout=30).json()
    return any(w["state"] == "busy" for w in status["pool"]["workers"])


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    """Poll until ``condition`` holds; the ceiling is generous (a loaded machine), the wait is not."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def worker_pids(server: LiveServer) -> list[int]:
    status = httpx.get(f"{server.url}/readyz", timeout=5).json()
    return [w["pid"] for w in status["pool"]["workers"] if w.get("pid")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it only waits for its parent to read its exit status.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], timeout_s: float = 120.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def gradient(server: LiveServer, expression: str, **extra: Any) -> httpx.Response:
    body = {"expression": expression, "variables": {"x": 1.5}, "dtype": "float64", **extra}
    return httpx.post(f"{server.url}/v1/gradient", json=body, timeout=300)


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[LiveServer]:
    server = start_server(tmp_path)
    try:
        server.wait_ready()
        yield server
    finally:
        stop_server(server)


def test_status_reports_each_worker(ready_server: LiveServer) -> None:
    status = httpx.get(f"{ready_server.url}/readyz", timeout=5).json()
    (worker,) = status["pool"]["workers"]
    assert worker["device"] == "cpu" and worker["state"] in ("idle", "busy") and worker["pid"] > 0


def test_a_killed_worker_fails_only_its_request_and_the_pool_heals(fresh_server: LiveServer) -> None:
    (pid,) = worker_pids(fresh_server)
    answers: list[httpx.Response] = []
    slow = threading.Thread(target=lambda: answers.append(gradient(fresh_server, SLOW)))
    slow.start()
    wait_for(lambda: worker_busy(fresh_server), "the slow request to run on the only worker")
    os.kill(pid, signal.SIGKILL)
    slow.join(timeout=300)
    (answer,) = answers
    assert answer.status_code == 503
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["code"] == "worker_crashed"
    # The pool respawns the worker; the next request is served correctly.
    fresh_server.wait_ready()
    after = gradient(fresh_server, "x**3")
    assert after.status_code == 200 and after.json()["gradient"]["x"] == pytest.approx(3 * 1.5**2)
    assert worker_pids(fresh_server) != [pid]


def restarts(server: LiveServer, cause: str) -> int:
    status = httpx.get(f"{server.url}/readyz", timeout=30).json()
    return sum(w["restarts_by_cause"][cause] for w in status["pool"]["workers"])


def test_a_deadline_answers_its_owner_and_the_job_finishes_into_the_cache(fresh_server: LiveServer) -> None:
    # BUSY runs ~2 s idle; its caller asked for 0.5 s. The caller gets its 504 at once, the worker is
    # not killed (a respawn would cost every client seconds), and the finished compile is cached.
    start = time.monotonic()
    answer = gradient(fresh_server, BUSY, timeout_s=0.5)
    elapsed = time.monotonic() - start
    problem = answer.json()
    assert answer.status_code == 504 and problem["code"] == "timeout" and problem["continues"] is True
    assert "a retry may find it cached" in problem["detail"]
    # At the deadline, not when the work ends (the slack is for a loaded machine, not a speed figure).
    assert elapsed < 0.5 + 10.0, elapsed
    (pid,) = worker_pids(fresh_server)
    again = gradient(fresh_server, BUSY)  # waits for the first job to end, then runs warm
    assert again.status_code == 200, again.text
    assert again.json()["meta"]["cache"] == "hit"
    assert worker_pids(fresh_server) == [pid] and restarts(fresh_server, "timeout") == 0


@pytest.fixture
def budget_server(tmp_path: Path) -> Iterator[LiveServer]:
    """A server whose jobs may run 3 s before their worker is killed."""
    server = start_server(tmp_path, {"TAPESERVE_WORKER_KILL_AFTER_S": "3", "TAPESERVE_QUARANTINE_S": "600"})
    try:
        server.wait_ready()
        yield server
    finally:
        stop_server(server)


def test_a_job_past_the_kill_budget_loses_its_worker_and_its_program_is_quarantined(
    budget_server: LiveServer,
) -> None:
    start = time.monotonic()
    answer = gradient(budget_server, SLOW, timeout_s=1.0)
    assert answer.status_code == 504 and answer.json()["code"] == "timeout"
    assert time.monotonic() - start < 1.0 + 10.0
    # SLOW runs ~18 s: at 3 s of running its worker is killed and replaced.
    wait_for(lambda: restarts(budget_server, "timeout") == 1, "the overrunning worker to be replaced")
    budget_server.wait_ready()
    # The same program again is refused at once, for the quarantine's time, without taking a worker.
    refused = gradient(budget_server, SLOW)
    problem = refused.json()
    assert refused.status_code == 422 and problem["code"] == "quarantined", refused.text
    assert "ran past the 3 s" in problem["detail"] and problem["until"] > time.time()
    assert 500 <= int(refused.headers["retry-after"]) <= 600
    # Everybody else is served as usual.
    assert gradient(budget_server, "x**2").json()["gradient"]["x"] == pytest.approx(3.0)
    assert restarts(budget_server, "timeout") == 1 and restarts(budget_server, "crash") == 0


def test_a_job_past_the_memory_ceiling_is_stopped_inside_its_worker(tmp_path: Path) -> None:
    # A 1200 MiB ceiling, and element limits loose enough that only the ceiling stands in the way.
    env = {"TAPESERVE_WORKER_MEMORY_MB": "1200", "TAPESERVE_MAX_TENSOR_ELEMENTS": "400000000"}
    server = start_server(tmp_path, env)
    try:
        server.wait_ready()
        body = {"expression": "sum(x[:, None] * x[None, :])", "variables": {"x": [0.5] * 17_000}}
        # The outer product alone is 17,000**2 float64 = 2.3 GB: about twice the ceiling.
        start = time.monotonic()
        answer = httpx.post(f"{server.url}/v1/gradient", json={**body, "dtype": "float64"}, timeout=300)
        assert answer.status_code == 422, answer.text
        assert answer.json()["code"] == "memory_limit"
        assert time.monotonic() - start < 60  # stopped at the allocation, not after swapping or OOM
        # The allocation failed inside the worker, which never held that memory: it serves on, and the
        # next request is answered as usual.
        (pid,) = worker_pids(server)
        assert gradient(server, "x**2").json()["gradient"]["x"] == pytest.approx(3.0)
        assert worker_pids(server) == [pid] and restarts(server, "crash") == 0
        status = httpx.get(f"{server.url}/readyz", timeout=30).json()
        assert all(w["rss_mb"] is None or w["rss_mb"] < 1200 for w in status["pool"]["workers"])
        # The same program again is quarantined rather than run into the ceiling once more.
        again = httpx.post(f"{server.url}/v1/gradient", json={**body, "dtype": "float64"}, timeout=300)
        assert again.status_code == 422 and again.json()["code"] == "quarantined"
        assert "more memory" in again.json()["detail"]
    finally:
        stop_server(server)


def test_sigterm_finishes_in_flight_work_then_stops_every_worker(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        server.wait_ready()
        pids = worker_pids(server)
        answers: list[httpx.Response] = []
        slow = threading.Thread(target=lambda: answers.append(gradient(server, BUSY)))
        slow.start()
        wait_for(lambda: worker_busy(server), "the request to run on the only worker")
        server.process.send_signal(signal.SIGTERM)
        slow.join(timeout=300)
        (answer,) = answers
        assert answer.status_code == 200, answer.text  # drained, not dropped
        # uvicorn re-raises the signal after its graceful shutdown, so the exit status says SIGTERM.
        assert server.process.wait(timeout=120) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.log()
        assert wait_gone(pids) == []
    finally:
        stop_server(server)


def test_killing_the_api_process_hard_leaves_no_worker(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        server.wait_ready()
        pids = worker_pids(server)
        assert pids and all(alive(p) for p in pids)
        server.process.kill()
        server.process.wait(timeout=60)
        assert wait_gone(pids) == []
    finally:
        stop_server(server)
