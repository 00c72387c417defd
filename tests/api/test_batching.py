"""Dynamic batching in the API process: who waits, who is stacked, and how results come back."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np
import pytest

from service.api.batching import Batcher
from service.errors import EvaluationError, Timeout
from service.jobs import GradientJob, GradientResult, StackedGradientJob
from tests.conftest import LiveServer
from tests.tolerances import CLOSED_FORM, assert_close

WINDOW_S = 0.005
PATIENCE_S = 60.0  # ceiling of waits that end in milliseconds (generous for a loaded machine)


class RecordingPool:
    """Answers each job with its x's sum as the value; idleness is set by the test."""

    def __init__(self, idle: int = 0) -> None:
        self.idle = idle
        self.jobs: list[Any] = []
        self.timeouts: list[float | None] = []
        self.fail_stacked: BaseException | None = None
        self.release = asyncio.Event()
        self.release.set()

    @property
    def idle_workers(self) -> int:
        return self.idle

    async def run(self, job: Any, *, timeout_s: float | None = None, affinity: str | None = None) -> Any:
        self.jobs.append(job)
        self.timeouts.append(timeout_s)
        await self.release.wait()
        if isinstance(job, StackedGradientJob):
            if self.fail_stacked is not None:
                raise self.fail_stacked
            return [answer(j) for j in job.jobs]
        if float(job.variables["x"].sum()) < 0:
            raise EvaluationError("negative")
        return answer(job)


def answer(job: GradientJob) -> GradientResult:
    return GradientResult(value=np.asarray(job.variables["x"].sum()))


def job(value: float) -> GradientJob:
    return GradientJob("sum(x)", {"x": np.full(2, value)})


async def warm(batcher: Batcher, pool: RecordingPool) -> None:
    """Make the signature hot (batching only stacks programs that come back)."""
    idle, pool.idle = pool.idle, 1
    for _ in range(3):
        await batcher.run(job(0.0), timeout_s=5, affinity="k")
    pool.idle = idle
    pool.jobs.clear()
    pool.timeouts.clear()


async def gather(batcher: Batcher, values: list[float]) -> list[Any]:
    return await asyncio.gather(
        *(batcher.run(job(v), timeout_s=5, affinity="k") for v in values), return_exceptions=True
    )


def test_cold_programs_are_never_stacked() -> None:
    async def scenario() -> None:
        pool = RecordingPool(idle=0)
        batcher = Batcher(pool, WINDOW_S, 64)
        results = await gather(batcher, [1.0, 2.0])
        assert [float(r.value) for r in results] == [2.0, 4.0]
        assert all(isinstance(j, GradientJob) for j in pool.jobs)

    asyncio.run(scenario())


def test_a_request_finding_a_worker_idle_is_sent_at_once() -> None:
    async def scenario() -> None:
        pool = RecordingPool(idle=1)
        batcher = Batcher(pool, 10.0, 64)  # a 10 s window: waiting for it would hang the test
        await warm(batcher, pool)
        # Within half the window: it went at once (the ceiling's slack is for a loaded machine).
        result = await asyncio.wait_for(batcher.run(job(3.0), timeout_s=5, affinity="k"), 5.0)
        assert float(result.value) == 6.0 and isinstance(pool.jobs[0], GradientJob)

    asyncio.run(scenario())


def test_requests_meeting_a_busy_pool_go_as_one_stacked_call_and_split_back_in_order() -> None:
    async def scenario() -> None:
        pool = RecordingPool(idle=0)
        batcher = Batcher(pool, WINDOW_S, 64)
        await warm(batcher, pool)
        pending = asyncio.ensure_future(gather(batcher, [1.0, 2.0, 3.0, 4.0, 5.0]))
        await asyncio.sleep(WINDOW_S * 3)
        assert pool.jobs == []  # still gathering: every worker is busy
        pool.idle = 1  # a worker frees up: the group goes at the next window
        results = await asyncio.wait_for(pending, PATIENCE_S)
        assert [float(r.value) for r in results] == [2.0, 4.0, 6.0, 8.0, 10.0]
        (stacked,) = pool.jobs
        assert isinstance(stacked, StackedGradientJob) and len(stacked.jobs) == 5
        assert batcher.stacked_calls == 1 and batcher.stacked_requests == 5

    asyncio.run(scenario())


def test_each_member_of_a_group_keeps_its_own_deadline() -> None:
    async def scenario() -> None:
        pool = RecordingPool(idle=0)
        batcher = Batcher(pool, WINDOW_S, 3)  # the third request fills the group: it goes at once
        await warm(batcher, pool)
        pool.release.clear()  # the stacked call is slow: it outlives the short deadline
        short = asyncio.ensure_future(batcher.run(job(1.0), timeout_s=0.2, affinity="k"))
        long = [asyncio.ensure_future(batcher.run(job(v), timeout_s=30, affinity="k")) for v in (2.0, 3.0)]
        with pytest.raises(Timeout):
            await asyncio.wait_for(short, PATIENCE_S)
        assert not any(task.done() for task in long)  # the others still wait, on their own deadlines
        pool.release.set()
        results = await asyncio.wait_for(asyncio.gather(*long), PATIENCE_S)
        assert [float(r.value) for r in results] == [4.0, 6.0]
        (stacked,) = pool.jobs
        assert isinstance(stacked, StackedGradientJob) and len(stacked.jobs) == 3
        # The group ran under its latest deadline, not its earliest.
        (budget,) = pool.timeouts
        assert budget is not None and budget > 20

    asyncio.run(scenario())


def test_a_full_group_goes_without_waiting() -> None:
    async def scenario() -> None:
        pool = RecordingPool(idle=0)
        batcher = Batcher(pool, 10.0, 4)
        await warm(batcher, pool)
        # Within half the 10 s window: it went at once (the slack is for a loaded machine).
        results = await asyncio.wait_for(gather(batcher, [1.0, 1.0, 1.0, 1.0]), 5.0)
        assert len(results) == 4 and isinstance(pool.jobs[0], StackedGradientJob)

    asyncio.run(scenario())


def test_a_user_error_in_a_stacked_call_is_answered_per_request() -> None:
    async def scenario() -> None:
        pool = RecordingPool(idle=0)
        pool.fail_stacked = EvaluationError("one request's values failed the stacked call")
        batcher = Batcher(pool, WINDOW_S, 3)
        await warm(batcher, pool)
        results = await asyncio.wait_for(gather(batcher, [1.0, -1.0, 2.0]), PATIENCE_S)
        assert float(results[0].value) == 2.0 and float(results[2].value) == 4.0
        assert isinstance(results[1], EvaluationError) and results[1].detail == "negative"

    asyncio.run(scenario())


def test_pool_failures_reach_every_request_of_the_group() -> None:
    async def scenario() -> None:
        pool = RecordingPool(idle=0)
        pool.fail_stacked = Timeout("too slow")
        batcher = Batcher(pool, WINDOW_S, 2)
        await warm(batcher, pool)
        results = await asyncio.wait_for(gather(batcher, [1.0, 2.0]), PATIENCE_S)
        assert all(isinstance(r, Timeout) for r in results)

    asyncio.run(scenario())


def test_batching_off_sends_every_request_alone() -> None:
    async def scenario() -> None:
        pool = RecordingPool(idle=0)
        batcher = Batcher(pool, 0.0, 64)
        await warm(batcher, pool)
        await gather(batcher, [1.0, 2.0, 3.0])
        assert len(pool.jobs) == 3 and all(isinstance(j, GradientJob) for j in pool.jobs)

    asyncio.run(scenario())


async def worker_busy(client: httpx.AsyncClient) -> bool:
    status = (await client.get("/readyz")).json()
    return any(w["state"] == "busy" for w in status["pool"]["workers"])


def test_concurrent_clients_of_a_live_server_are_stacked_and_each_gets_its_own_answer(
    ready_server: LiveServer,
) -> None:
    # The one worker is kept busy by a float64 3000x3000 matmul and its gradient (~2 s idle, x-dependent
    # so nothing folds it into a constant); hot requests that arrive meanwhile meet a busy worker and
    # are stacked.
    m = "reshape(sin(arange(9000000) * y), (3000, 3000))"
    blocker = {"expression": f"sum(matmul({m}, {m}))", "variables": {"y": 0.5}, "dtype": "float64"}
    expression = "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)"
    rng = np.random.default_rng(7)
    points = rng.normal(size=(96, 10))

    def expected_gradient(x: np.ndarray) -> np.ndarray:
        g = np.zeros_like(x)
        g[:-1] = -400 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2 * (1 - x[:-1])
        g[1:] += 200 * (x[1:] - x[:-1] ** 2)
        return g

    async def scenario() -> tuple[httpx.Response, list[httpx.Response]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=ready_server.url, timeout=120, limits=limits) as client:
            body = {"expression": expression, "dtype": "float64"}
            for x in points[:4]:  # make the program hot (compiled, seen often)
                (
                    await client.post("/v1/gradient", json={**body, "variables": {"x": x.tolist()}})
                ).raise_for_status()
            busy = asyncio.create_task(client.post("/v1/gradient", json=blocker))
            while not await worker_busy(client):
                assert not busy.done(), "the blocker ended before it was seen running"
                await asyncio.sleep(0.02)
            answers = await asyncio.gather(
                *(client.post("/v1/gradient", json={**body, "variables": {"x": x.tolist()}}) for x in points)
            )
            return await busy, answers

    before = httpx.get(f"{ready_server.url}/readyz").json()["batching"]
    blocked, answers = asyncio.run(scenario())
    assert blocked.status_code == 200, blocked.text
    for x, answer in zip(points, answers, strict=True):
        assert answer.status_code == 200, answer.text
        assert_close(answer.json()["gradient"]["x"], expected_gradient(x), CLOSED_FORM, "gradient")
    after = httpx.get(f"{ready_server.url}/readyz").json()["batching"]
    assert after["stacked_requests"] > before["stacked_requests"]
