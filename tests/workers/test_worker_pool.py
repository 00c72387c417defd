"""The pool with real spawned workers: results, errors, dispatch, and surviving kills, aborts and deadlines.

One two-worker pool serves the whole module; tests that kill workers wait for it to heal first.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import numpy as np
import pytest

from service.errors import Overloaded, Quarantined, ShapeError, TapeserveError, Timeout, WorkerCrashed
from service.limits import Limits
from service.workers import WorkerPool
from tests.workers.conftest import Driver
from tests.workers.handlers import SignedJob
from tests.workers.pool_probes import all_idle, busy_pids, restarts, wait_until

LIMITS = Limits(max_order=3)


@pytest.fixture(scope="module")
def pool(make_pool: Any) -> WorkerPool:
    pool: WorkerPool = make_pool(
        devices=("cpu", "cpu"),
        default_timeout_s=20.0,
        cache_size=8,
        limits=LIMITS,
        warmup="tests.workers.handlers:warmup",
    )
    return pool


@pytest.fixture
def healed(pool: WorkerPool, drive: Driver) -> WorkerPool:
    drive(all_idle(pool))
    return pool


def test_arrays_in_and_out(healed: WorkerPool, drive: Driver) -> None:
    x = np.linspace(0, 1, 1000, dtype=np.float32).reshape(10, 100)
    back = drive(healed.run({"op": "echo", "value": {"x": x, "n": 3}}))
    np.testing.assert_array_equal(back["x"], x)
    assert back["x"].dtype == np.float32 and back["n"] == 3


def test_after_reply_runs_once_per_reply_and_its_errors_are_only_logged(
    healed: WorkerPool, drive: Driver
) -> None:
    job = SignedJob(op="after_replies", signature="after-reply")
    first = drive(healed.run(job))
    pid = drive(healed.run(SignedJob(op="pid", signature="after-reply")))
    second = drive(healed.run(SignedJob(op="after_replies", signature="after-reply", then_raise=True)))
    assert second == first + 2  # after each of the two replies before it
    assert drive(healed.run(SignedJob(op="after_replies", signature="after-reply"))) == second + 1
    assert drive(healed.run(SignedJob(op="pid", signature="after-reply"))) == pid  # no restart


def test_child_gets_limits_warmup_and_environment(healed: WorkerPool, drive: Driver) -> None:
    assert drive(healed.run({"op": "limits"})) == LIMITS
    assert drive(healed.run({"op": "warmed"})) is True
    names = [
        "CUDA_VISIBLE_DEVICES",
        "TF_NUM_INTRAOP_THREADS",
        "TF_NUM_INTEROP_THREADS",
        "OMP_NUM_THREADS",
        "TF_CPP_MIN_LOG_LEVEL",
        "TAPESERVE_CACHE_SIZE",
    ]
    env = drive(healed.run({"op": "env", "names": names}))
    assert env == dict(zip(names, ["-1", "1", "1", "1", "2", "8"], strict=True))


def test_user_error_is_rebuilt_in_the_parent(healed: WorkerPool, drive: Driver) -> None:
    with pytest.raises(ShapeError) as caught:
        drive(healed.run({"op": "shape_error"}))
    assert caught.value.status == 422 and caught.value.extra == {"left": [2], "right": [3]}
    assert "shape (2,)" in caught.value.detail


def test_handler_bug_is_an_internal_error_without_details(healed: WorkerPool, drive: Driver) -> None:
    with pytest.raises(TapeserveError) as caught:
        drive(healed.run({"op": "bug"}))
    assert type(caught.value) is TapeserveError and caught.value.status == 500
    assert "secret" not in str(caught.value.to_dict())
    # A handler exception is not a crash: same workers, no restart.
    assert drive(healed.run({"op": "echo", "value": 1})) == 1
    assert restarts(healed, "crash") == 0


def test_cache_affinity_prefers_the_worker_that_served_the_key(healed: WorkerPool, drive: Driver) -> None:
    async def pids(key: str) -> set[int]:
        return {await healed.run({"op": "pid"}, affinity=key) for _ in range(6)}

    first, second = drive(pids("sig-a")), drive(pids("sig-b"))
    assert len(first) == 1 and len(second) == 1
    # Least recently used: a new key goes to the other, equally idle worker.
    assert first != second
    # A job with a signature() uses it as the key.
    assert drive(healed.run(SignedJob(op="pid", signature="sig-a"))) in first


def test_status_shape(healed: WorkerPool) -> None:
    status = healed.status()
    assert status["queue_depth"] == 0 and status["in_flight"] == 0 and status["ready"] is True
    assert [w["id"] for w in status["workers"]] == [0, 1]
    for worker in status["workers"]:
        assert set(worker) >= {"id", "pid", "device", "state", "jobs", "restarts", "rss_mb", "last_exit"}
        assert worker["device"] == "cpu" and worker["state"] == "idle" and worker["rss_mb"] > 0
        assert set(worker["restarts_by_cause"]) == {"crash", "timeout", "memory", "recycle"}


def test_kill_9_during_a_request(healed: WorkerPool, drive: Driver) -> None:
    crashes = restarts(healed, "crash")

    async def scenario() -> None:
        task = asyncio.ensure_future(healed.run({"op": "sleep", "seconds": 30}))
        (pid,) = await busy_pids(healed)
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(WorkerCrashed) as caught:
            await task
        # Noticed at once, not when the 30 s job would have ended (the slack is for a loaded machine).
        assert time.monotonic() - started < 15.0
        assert caught.value.status == 503 and "SIGKILL" in caught.value.detail
        await all_idle(healed)
        assert pid not in [w["pid"] for w in healed.status()["workers"]]
        assert await healed.run({"op": "echo", "value": "after"}) == "after"

    drive(scenario())
    assert restarts(healed, "crash") == crashes + 1
    last = [w["last_exit"] for w in healed.status()["workers"] if w["last_exit"]]
    assert any(e["cause"] == "crash" and e["signal"] == "SIGKILL" for e in last)


@pytest.mark.parametrize("how", ["kill -9", "abort", "segfault"])
def test_crash_under_load_fails_only_the_job_in_flight(how: str, healed: WorkerPool, drive: Driver) -> None:
    async def scenario() -> list[Any]:
        doomed_job = {"op": "sleep", "seconds": 30} if how == "kill -9" else {"op": how}
        if how == "kill -9":
            doomed = asyncio.ensure_future(healed.run(doomed_job))
            (pid,) = await busy_pids(healed)
        # A stream of jobs through both workers while one of them dies.
        others = [
            asyncio.ensure_future(healed.run({"op": "sleep", "seconds": 0.02, "value": i})) for i in range(40)
        ]
        await asyncio.sleep(0.1)
        if how == "kill -9":
            os.kill(pid, signal.SIGKILL)
        else:
            doomed = asyncio.ensure_future(healed.run(doomed_job))
        return await asyncio.gather(doomed, *others, return_exceptions=True)

    results = drive(scenario())
    assert isinstance(results[0], WorkerCrashed), results[0]
    assert results[1:] == list(range(40))
    drive(all_idle(healed))
    assert drive(healed.run({"op": "echo", "value": 7})) == 7


def test_a_deadline_answers_its_caller_and_the_job_keeps_its_worker(
    healed: WorkerPool, drive: Driver
) -> None:
    before = restarts(healed, "timeout")
    pids = sorted(w["pid"] for w in healed.status()["workers"])

    async def scenario() -> float:
        started = time.monotonic()
        with pytest.raises(Timeout) as caught:
            await healed.run({"op": "sleep", "seconds": 2.0}, timeout_s=0.5)
        assert caught.value.status == 504 and caught.value.extra["continues"] is True
        elapsed = time.monotonic() - started
        # The job goes on: its worker is busy with it, and nobody is killed.
        status = healed.status()
        assert status["abandoned"] == 1 and any(w["state"] == "busy" for w in status["workers"])
        return elapsed

    elapsed = drive(scenario())
    assert 0.45 <= elapsed < 10.0  # at the deadline, not at the job's end (slack: a loaded machine)
    drive(all_idle(healed))
    assert restarts(healed, "timeout") == before
    assert sorted(w["pid"] for w in healed.status()["workers"]) == pids
    assert healed.status()["abandoned"] == 0
    assert drive(healed.run({"op": "echo", "value": "alive"})) == "alive"


def test_a_job_past_the_kill_budget_loses_its_worker(make_pool: Any, drive: Driver) -> None:
    pool = make_pool(default_timeout_s=20.0, kill_after_s=1.0)

    async def scenario() -> None:
        with pytest.raises(Timeout):
            await pool.run({"op": "sleep", "seconds": 30}, timeout_s=0.5)
        # Python cannot interrupt the job: at 1 s of running, its worker is killed and replaced.
        await wait_until(lambda: restarts(pool, "timeout") == 1, what="the overrunning worker replaced")
        await all_idle(pool)

    drive(scenario())
    assert drive(pool.run({"op": "echo", "value": "alive"})) == "alive"
    assert pool.status()["workers"][0]["last_exit"]["cause"] == "timeout"


def test_a_program_that_crashes_a_worker_is_quarantined(make_pool: Any, drive: Driver) -> None:
    pool = make_pool(quarantine_s=600.0)
    poison = SignedJob(op="abort", signature="poison")

    async def scenario() -> None:
        with pytest.raises(WorkerCrashed):
            await pool.run(poison)
        await all_idle(pool)
        # Refused at once now, with why and for how long; no worker is spent on it.
        with pytest.raises(Quarantined) as caught:
            await pool.run(poison)
        error = caught.value
        assert error.status == 422 and error.code == "quarantined" and "crashed a worker" in error.detail
        assert 590 <= error.retry_after <= 600 and error.extra["until"] > time.time() + 590
        # Other programs, and jobs without a signature, still run.
        assert await pool.run(SignedJob(op="echo", value=1, signature="fine")) == 1
        assert await pool.run({"op": "echo", "value": 2}) == 2

    drive(scenario())
    assert restarts(pool, "crash") == 1 and pool.status()["quarantined"] == 1


def test_a_quarantine_ends(make_pool: Any, drive: Driver) -> None:
    pool = make_pool(quarantine_s=0.5)
    poison = SignedJob(op="abort", signature="briefly-poison")

    async def scenario() -> None:
        with pytest.raises(WorkerCrashed):
            await pool.run(poison)
        with pytest.raises(Quarantined):
            await pool.run(SignedJob(op="echo", signature="briefly-poison"))
        await asyncio.sleep(0.6)
        assert await pool.run(SignedJob(op="echo", value=3, signature="briefly-poison")) == 3

    drive(scenario())


def test_queue_wait_counts_toward_the_deadline(healed: WorkerPool, drive: Driver) -> None:
    before = restarts(healed, "timeout")

    async def scenario() -> None:
        blockers = [
            asyncio.ensure_future(healed.run({"op": "sleep", "seconds": 5.0, "value": i})) for i in range(2)
        ]
        await busy_pids(healed, 2)
        with pytest.raises(Timeout):
            await healed.run({"op": "echo", "value": "late"}, timeout_s=0.5)
        # It timed out in the queue: both workers were still busy when its deadline came.
        assert not any(blocker.done() for blocker in blockers)
        assert await asyncio.gather(*blockers) == [0, 1]

    drive(scenario())
    assert restarts(healed, "timeout") == before  # nobody was running it: no worker was killed


def test_timeout_cannot_exceed_the_configured_default(make_pool: Any, drive: Driver) -> None:
    pool = make_pool(default_timeout_s=1.0)

    async def scenario() -> float:
        started = time.monotonic()
        with pytest.raises(Timeout):
            await pool.run({"op": "sleep", "seconds": 30}, timeout_s=60)
        return time.monotonic() - started

    assert drive(scenario()) < 15.0  # the default's 1 s, not the asked 60 s nor the job's 30 s


def test_a_cancelled_queued_request_is_dropped(healed: WorkerPool, drive: Driver) -> None:
    async def scenario() -> None:
        blockers = [asyncio.ensure_future(healed.run({"op": "sleep", "seconds": 3.0})) for _ in range(2)]
        await busy_pids(healed, 2)
        waiting = asyncio.ensure_future(healed.run({"op": "echo", "value": 1}))
        await wait_until(lambda: healed.status()["queue_depth"] == 1, what="the queued job")
        waiting.cancel()
        await asyncio.sleep(0)
        assert healed.status()["queue_depth"] == 0
        await asyncio.gather(*blockers)

    drive(scenario())


def test_queue_full_is_overloaded_at_once(make_pool: Any, drive: Driver) -> None:
    pool = make_pool(queue_size=2)

    async def scenario() -> None:
        running = asyncio.ensure_future(pool.run({"op": "sleep", "seconds": 3.0, "value": "a"}))
        await busy_pids(pool)
        queued = [asyncio.ensure_future(pool.run({"op": "echo", "value": v})) for v in "bc"]
        await wait_until(lambda: pool.status()["queue_depth"] == 2, what="two queued jobs")
        with pytest.raises(Overloaded) as caught:
            await pool.run({"op": "echo", "value": "d"})
        # At once: refused while the queue is still full, without waiting for a place.
        assert not running.done() and pool.status()["queue_depth"] == 2
        error = caught.value
        assert error.status == 503 and error.code == "overloaded" and error.retry_after == 1  # type: ignore[attr-defined]
        assert error.to_dict()["retry_after"] == 1
        assert await asyncio.gather(running, *queued) == ["a", "b", "c"]

    drive(scenario())
