"""Pool lifecycle with real processes: recycling, memory ceiling, crash loops, shutdown, no orphans."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from service.errors import MemoryLimitExceeded, Overloaded, Timeout, WorkerCrashed
from service.workers import PoolConfig, WorkerPool
from tests.workers.conftest import HANDLER, ROOT, Driver
from tests.workers.pool_probes import PATIENCE_S, all_idle, busy_pids, pid_gone, restarts, wait_until


def test_recycling_after_n_jobs_drops_nothing(make_pool: Any, drive: Driver) -> None:
    pool = make_pool(max_jobs_per_worker=3)
    first_pid = pool.status()["workers"][0]["pid"]

    async def scenario() -> list[Any]:
        return await asyncio.gather(*(pool.run({"op": "echo", "value": i}) for i in range(10)))

    assert drive(scenario()) == list(range(10))
    drive(all_idle(pool))
    # The old process serves on while its successor starts: at least one replacement, maybe fewer
    # than one per 3 jobs; every job answered.
    drive(wait_until(lambda: pool.status()["workers"][0]["last_exit"] is not None, what="the old one's exit"))
    worker = pool.status()["workers"][0]
    assert worker["jobs"] == 10 and worker["pid"] != first_pid
    assert 1 <= worker["restarts_by_cause"]["recycle"] <= 3
    assert {k: v for k, v in worker["restarts_by_cause"].items() if k != "recycle"} == {
        "crash": 0, "timeout": 0, "memory": 0,
    }  # fmt: skip
    assert worker["last_exit"]["cause"] == "recycle" and worker["last_exit"]["exitcode"] == 0


def test_workers_take_the_configured_nice_before_their_threads_start(make_pool: Any, drive: Driver) -> None:
    # Raising nice needs no privilege; the worker's later threads (here its parent watch) inherit it.
    wanted = min(os.getpriority(os.PRIO_PROCESS, 0) + 3, 19)
    pid = drive(make_pool(nice=wanted).run({"op": "pid"}))
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat", encoding="ascii") as stat:
            assert int(stat.read().rsplit(")", 1)[1].split()[16]) == wanted


def test_recycling_starts_the_successor_first_so_no_job_waits_for_a_start(
    make_pool: Any, drive: Driver
) -> None:
    pool = make_pool(max_jobs_per_worker=2, warmup="tests.workers.handlers:slow_warmup")
    first = drive(pool.run({"op": "pid"}))
    assert drive(pool.run({"op": "pid"})) == first  # its 2nd job: the successor starts (1.5 s warm-up)
    # Meanwhile the old process keeps serving: with plain stop-then-start this job would wait for
    # a whole start-up, on a new process.
    assert drive(pool.run({"op": "pid"})) == first
    drive(wait_until(lambda: pool.status()["workers"][0]["pid"] != first, what="the successor takes over"))
    second = drive(pool.run({"op": "pid"}))
    assert second != first
    drive(wait_until(lambda: pid_gone(first), what="the old process exits"))
    # The process can be gone (a zombie) before the pool's reaper has recorded its exit: wait for the record.
    drive(wait_until(lambda: pool.status()["workers"][0]["last_exit"] is not None, what="the exit recorded"))
    worker = pool.status()["workers"][0]
    assert worker["restarts_by_cause"]["recycle"] == 1 and worker["restarts_by_cause"]["crash"] == 0
    assert worker["last_exit"]["cause"] == "recycle" and worker["last_exit"]["exitcode"] == 0


def test_the_memory_ceiling_holds_during_a_job(make_pool: Any, drive: Driver) -> None:
    pool = make_pool(devices=("cpu", "cpu"), memory_limit_mb=300)

    async def scenario() -> list[Any]:
        jobs = [pool.run({"op": "allocate", "mb": 600, "value": "big"})]  # twice the ceiling
        jobs += [pool.run({"op": "sleep", "seconds": 0.01, "value": i}) for i in range(20)]
        return await asyncio.gather(*jobs, return_exceptions=True)

    results = drive(scenario())
    # Stopped at the ceiling, inside the worker, as this job's own error: nothing else failed.
    assert isinstance(results[0], MemoryLimitExceeded), results[0]
    assert results[0].status == 422 and "300 MiB" in results[0].detail
    assert results[1:] == list(range(20))
    # The allocation never happened, so the worker serves on: no restart costs anyone seconds.
    drive(all_idle(pool))
    assert restarts(pool, "crash") == 0 and restarts(pool, "memory") == 0
    assert all(w["rss_mb"] < 300 for w in pool.status()["workers"])
    # Under the ceiling, work goes on as usual.
    assert drive(pool.run({"op": "allocate", "mb": 50, "value": "small"})) == "small"
    for i in range(5):
        assert drive(pool.run({"op": "echo", "value": i})) == i
    # The ceiling holds across jobs too: memory one job keeps (a leak of 50 MB per job) counts for the
    # next, which is refused before the worker's resident size passes the ceiling.

    async def leak() -> list[Any]:
        return [await pool.run({"op": "allocate", "mb": 50}) for _ in range(14)]  # 700 MB > 2 x 300

    with pytest.raises(MemoryLimitExceeded):
        drive(leak())
    assert all(w["rss_mb"] < 300 for w in pool.status()["workers"])


def test_a_worker_that_cannot_start_backs_off(make_pool: Any, drive: Driver) -> None:
    pool = make_pool(handler="tests.workers.handlers:no_such_function", ready=False, default_timeout_s=1.0)
    assert drive(pool.wait_ready(2.0)) is False
    worker = pool.status()["workers"][0]
    assert worker["restarts_by_cause"]["crash"] >= 2
    assert "AttributeError" in worker["last_exit"]["detail"]
    assert worker["state"] in ("starting", "backoff")
    # Without backoff it would restart every ~0.3 s; with it, the gaps grow.
    drive(wait_until(lambda: pool.status()["workers"][0]["state"] == "backoff", what="backoff"))
    with pytest.raises(Timeout):
        drive(pool.run({"op": "echo", "value": 1}))


def test_missing_warmup_module_is_skipped(make_pool: Any, drive: Driver) -> None:
    pool = make_pool(warmup="tests.workers.no_such_module:warmup")
    assert drive(pool.run({"op": "warmed"})) is False


def test_close_drains_queued_and_running_jobs(make_pool: Any, drive: Driver) -> None:
    pool = make_pool(queue_size=4)
    pid = pool.status()["workers"][0]["pid"]

    async def scenario() -> list[Any]:
        jobs = [
            asyncio.ensure_future(pool.run({"op": "sleep", "seconds": 0.3, "value": i})) for i in range(3)
        ]
        await busy_pids(pool)
        await pool.close(grace_s=10.0)
        assert all(job.done() for job in jobs)
        with pytest.raises(Overloaded, match="shutting down"):
            await pool.run({"op": "echo", "value": 1})
        return await asyncio.gather(*jobs)

    assert drive(scenario()) == [0, 1, 2]
    assert pool.status()["workers"][0]["state"] == "stopped" and not pool.ready
    assert pool.status()["workers"][0]["restarts"] == 0
    drive(wait_until(lambda: pid_gone(pid), what="worker exit"))


def test_close_grace_expiry_cuts_off_long_jobs(make_pool: Any, drive: Driver) -> None:
    pool = make_pool(queue_size=4)
    pid = pool.status()["workers"][0]["pid"]

    async def scenario() -> list[Any]:
        jobs = [asyncio.ensure_future(pool.run({"op": "sleep", "seconds": 30})) for _ in range(2)]
        await busy_pids(pool)
        started = time.monotonic()
        await pool.close(grace_s=0.5)
        # Cut off, not drained: the jobs would have run 30 s (the rest is slack for a loaded machine).
        assert time.monotonic() - started < 15.0
        return await asyncio.gather(*jobs, return_exceptions=True)

    running, queued = drive(scenario())
    assert isinstance(running, WorkerCrashed) and "shut down" in running.detail
    assert isinstance(queued, Overloaded) and "shutting down" in queued.detail
    drive(wait_until(lambda: pid_gone(pid), what="worker exit"))


def test_close_before_start_and_twice(drive: Driver) -> None:
    pool = WorkerPool(PoolConfig(devices=("cpu",), handler=HANDLER, warmup=None))
    drive(pool.close())
    drive(pool.close())
    with pytest.raises(RuntimeError):
        drive(pool.run({"op": "echo"}))


def test_killing_the_parent_hard_leaves_no_worker(drive: Driver) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen(
        [sys.executable, "-m", "tests.workers.pool_process", "orphans"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
    )
    try:
        assert parent.stdout is not None
        readable, _, _ = select.select([parent.stdout], [], [], PATIENCE_S)
        assert readable, "the helper never reported its workers"
        pids = json.loads(parent.stdout.readline())
        assert len(pids) == 2 and not any(pid_gone(pid) for pid in pids)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    drive(wait_until(lambda: all(pid_gone(pid) for pid in pids), what="orphaned workers to exit"))
