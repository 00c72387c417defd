"""Dynamic batching: concurrent requests for one compiled program run as one vectorized call.

A request that finds a worker idle is sent at once, so batching never delays a lone request. While
every worker is busy, requests for the same hot program (same signature) gather for up to the
window; the group then goes to a worker as one StackedGradientJob and the results are split back.
Per-request problems are never shared: if a stacked call fails with a user error, each request of
the group is answered on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.boundedcache import BoundedCache
from service.errors import Overloaded, TapeserveError, Timeout, WorkerCrashed
from service.jobs import GradientJob, GradientResult, StackedGradientJob

__all__ = ["Batcher"]

log = logging.getLogger("tapeserve.batching")

# Stacking helps where per-call overhead dominates: small problems. Past this many input elements per
# request a call is compute-bound and gains little from company.
_MAX_ELEMENTS = 4096
# A signature must have been seen this often before it is batched: stacking traces a second program,
# which is worth it only for programs that come back.
_HOT_AFTER = 3
# Signatures remembered for hotness (a bounded LRU of counters).
_TRACKED = 4096
_TRACKED_BYTES = 4 * 2**20
# A group waits at most this many windows for a worker to free up before it queues in the pool anyway.
_MAX_WINDOWS = 25


class _Pool(Protocol):
    @property
    def idle_workers(self) -> int: ...

    async def run(self, job: Any, *, timeout_s: float | None = None, affinity: str | None = None) -> Any: ...


@dataclass(eq=False)
class _Item:
    job: GradientJob
    future: asyncio.Future[GradientResult]
    deadline: float


@dataclass(eq=False)
class _Group:
    key: str
    items: list[_Item] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    windows: int = 0


class Batcher:
    """Runs GradientJobs on a pool, stacking concurrent ones of one signature."""

    def __init__(self, pool: _Pool, window_s: float, max_batch: int) -> None:
        self._pool = pool
        self._window_s = window_s
        self._max_batch = max_batch
        self._groups: OrderedDict[str, _Group] = OrderedDict()
        # Signatures hold the program's texts: bounded by their total length as well as their count.
        self._seen = BoundedCache[str, int](max_entries=_TRACKED, max_bytes=_TRACKED_BYTES)
        self._tasks: set[asyncio.Task[None]] = set()
        self.stacked_calls = 0
        self.stacked_requests = 0

    async def run(self, job: GradientJob, *, timeout_s: float, affinity: str) -> GradientResult:
        hot = self._count(affinity)
        if self._window_s <= 0 or not hot or not _stackable(job):
            return await self._single(job, timeout_s, affinity)
        group = self._groups.get(affinity)
        if group is None and self._pool.idle_workers > 0:
            return await self._single(job, timeout_s, affinity)
        loop = asyncio.get_running_loop()
        if group is None:
            group = _Group(affinity)
            self._groups[affinity] = group
            group.timer = loop.call_later(self._window_s, self._on_window, affinity)
        item = _Item(job, loop.create_future(), time.monotonic() + timeout_s)
        group.items.append(item)
        if len(group.items) >= self._max_batch:
            self._flush(affinity)
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), timeout_s)
        except TimeoutError:
            raise Timeout(
                f"the computation did not finish within {timeout_s:g} s", timeout_s=timeout_s
            ) from None

    async def _single(self, job: GradientJob, timeout_s: float, affinity: str) -> GradientResult:
        result: GradientResult = await self._pool.run(job, timeout_s=timeout_s, affinity=affinity)
        return result

    def _count(self, key: str) -> bool:
        count = (self._seen.get(key) or 0) + 1
        self._seen.put(key, count, size=len(key))
        return count >= _HOT_AFTER

    def _on_window(self, key: str) -> None:
        group = self._groups.get(key)
        if group is None:
            return
        group.windows += 1
        # Waiting here or in the pool's queue costs the same while every worker is busy; waiting
        # here lets the group grow. Send it when a worker is free, or after a bounded wait.
        if self._pool.idle_workers > 0 or group.windows >= _MAX_WINDOWS:
            self._flush(key)
        else:
            group.timer = asyncio.get_running_loop().call_later(self._window_s, self._on_window, key)

    def _flush(self, key: str) -> None:
        group = self._groups.pop(key, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        items = [item for item in group.items if not item.future.done()]
        if not items:
            return
        task = asyncio.get_running_loop().create_task(self._send(key, items))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, key: str, items: list[_Item]) -> None:
        try:
            # The group runs under its latest deadline; each member still waits only until its own
            # (run() bounds that wait), so one short deadline never fails the rest of the group.
            remaining = max(0.001, max(item.deadline for item in items) - time.monotonic())
            if len(items) == 1:
                await self._answer(items[0], key)
                return
            try:
                results = await self._pool.run(
                    StackedGradientJob([item.job for item in items]),
                    timeout_s=remaining,
                    affinity="stacked|" + key,
                )
            except (Timeout, Overloaded, WorkerCrashed) as error:
                for item in items:
                    _settle(item, error=error)
                return
            except TapeserveError as error:
                # One request's values (or the stacked program's size) broke the call: answer each alone,
                # so every request gets its own result or its own problem.
                log.debug(
                    "stacked call failed (%s); answering %d requests one by one", error.code, len(items)
                )
                await asyncio.gather(*(self._answer(item, key) for item in items))
                return
            self.stacked_calls += 1
            self.stacked_requests += len(items)
            for item, result in zip(items, results, strict=True):
                _settle(item, result=result)
        finally:
            # A worker has just become free: the oldest waiting group goes now.
            if self._groups and self._pool.idle_workers > 0:
                self._flush(next(iter(self._groups)))

    async def _answer(self, item: _Item, key: str) -> None:
        remaining = max(0.001, item.deadline - time.monotonic())
        try:
            _settle(item, result=await self._single(item.job, remaining, key))
        except TapeserveError as error:
            _settle(item, error=error)


def _settle(item: _Item, *, result: GradientResult | None = None, error: BaseException | None = None) -> None:
    if item.future.done():
        return
    if error is not None:
        item.future.set_exception(error)
    else:
        item.future.set_result(result)  # type: ignore[arg-type]


def _stackable(job: GradientJob) -> bool:
    inputs = [*job.variables.values(), *job.constants.values()]
    return (
        not job.batch
        and job.order is None
        and "jvp" not in job.derivatives
        and bool(inputs)
        and sum(a.size for a in inputs) <= _MAX_ELEMENTS
    )
