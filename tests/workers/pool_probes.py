"""Waiting on and reading a pool's status in tests, without sleeping longer than needed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from service.workers import WorkerPool

# The ceiling of every wait in the worker tests. Each wait returns as soon as its condition holds
# (well under a second on an idle machine); the ceiling only decides when to give up, and a loaded
# 2-core CI machine has taken ~55 s to start one TensorFlow worker.
PATIENCE_S = 120.0


async def wait_until(
    condition: Callable[[], bool], timeout: float = PATIENCE_S, what: str = "condition"
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def all_idle(pool: WorkerPool, timeout: float = PATIENCE_S) -> None:
    """Every worker is warm and free (the pool has healed)."""
    await wait_until(
        lambda: all(w["state"] == "idle" for w in pool.status()["workers"]), timeout, "all workers idle"
    )


async def busy_pids(pool: WorkerPool, count: int = 1) -> list[int]:
    """Wait until ``count`` workers are running a job; their pids."""

    def busy() -> list[int]:
        return [w["pid"] for w in pool.status()["workers"] if w["state"] == "busy"]

    await wait_until(lambda: len(busy()) >= count, what=f"{count} busy workers")
    return busy()


def restarts(pool: WorkerPool, cause: str) -> int:
    return sum(w["restarts_by_cause"][cause] for w in pool.status()["workers"])


def pid_gone(pid: int) -> bool:
    """No such process, or only a zombie nobody has reaped yet (it runs nothing, holds no memory)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("State:"):
                    return line.split()[1] in ("Z", "X")
    except FileNotFoundError:
        return True
    return False
