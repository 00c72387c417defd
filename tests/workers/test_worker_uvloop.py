"""The pool under uvloop, the loop the server runs on: large replies written in parts arrive whole.

(Once, a blocking reader sharing the socket with libuv's poll saw it turned non-blocking, and a reply
written in several parts failed half-read: the worker was reaped as if it had died. The loop now
reads the pipe itself, frame by frame, and this stays the regression test.)
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.workers import PoolConfig, WorkerPool, transport
from tests.workers.conftest import HANDLER

uvloop = pytest.importorskip("uvloop")


def test_large_replies_after_a_pause_arrive_whole_under_uvloop() -> None:
    async def scenario() -> None:
        pool = WorkerPool(PoolConfig(devices=("cpu",), handler=HANDLER, warmup=None))
        await pool.start()
        assert await pool.wait_ready(60)
        try:
            for size in (10, transport.INLINE_MAX_BYTES, 3 * transport.INLINE_MAX_BYTES, 2_000_000):
                value = [np.arange(size, dtype=np.float64), np.ones(size // 2 + 1)]
                # The pause makes the reply's parts arrive while the parent is already waiting.
                reply = await pool.run({"op": "sleep", "seconds": 0.2, "value": value}, timeout_s=20)
                np.testing.assert_array_equal(reply[0], value[0])
                np.testing.assert_array_equal(reply[1], value[1])
            (worker,) = pool.status()["workers"]
            assert worker["restarts"] == 0 and worker["last_exit"] is None
        finally:
            await pool.close(grace_s=1.0)

    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    try:
        runner.run(asyncio.wait_for(scenario(), 90))
    finally:
        runner.close()
