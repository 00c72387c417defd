"""A separate API-like process running a pool, for what a test cannot check from inside pytest.

``python -m tests.workers.pool_process orphans``: starts two test workers, one busy, prints their pids,
then waits to be killed.  ``... engine``: runs a real gradient job through the real engine and prints
the result, and whether tensorflow ever entered this (parent) process.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import numpy as np

from service.errors import TapeserveError
from service.workers import PoolConfig, WorkerPool


async def orphans() -> None:
    pool = WorkerPool(
        PoolConfig(devices=("cpu", "cpu"), handler="tests.workers.handlers:dispatch", warmup=None)
    )
    await pool.start()
    while not all(w["state"] == "idle" for w in pool.status()["workers"]):
        await asyncio.sleep(0.02)
    busy = asyncio.ensure_future(pool.run({"op": "sleep", "seconds": 60}))
    while pool.status()["in_flight"] == 0:
        await asyncio.sleep(0.02)
    print(json.dumps([w["pid"] for w in pool.status()["workers"]]), flush=True)
    await busy


async def engine() -> None:
    from service.jobs import GradientJob

    pool = WorkerPool(PoolConfig(devices=("cpu",), default_timeout_s=120.0))
    await pool.start()
    report: dict[str, Any] = {"ready": await pool.wait_ready(120.0)}
    x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    result = await pool.run(GradientJob(expression="sum(x**2)", variables={"x": x}))
    report["value"] = float(result.value)
    report["gradient"] = result.gradient["x"].tolist()
    report["dtype"] = str(result.gradient["x"].dtype)
    again = await pool.run(GradientJob(expression="sum(x**2)", variables={"x": 2 * x}))
    report["second_gradient"] = again.gradient["x"].tolist()
    report["second_cache"] = again.cache
    try:
        await pool.run(GradientJob(expression="sum(x**", variables={"x": x}))
    except TapeserveError as exc:
        report["error"] = {"class": type(exc).__name__, **exc.to_dict()}
    report["worker"] = pool.status()["workers"][0]
    await pool.close()
    report["parent_tensorflow"] = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    asyncio.run({"orphans": orphans, "engine": engine}[sys.argv[1]]())
