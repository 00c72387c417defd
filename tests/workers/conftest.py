"""Fixtures for worker-pool tests: one event loop per module, and pools of real spawned processes."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from service.workers import PoolConfig, WorkerPool

ROOT = Path(__file__).resolve().parents[2]
# Spawned workers get the parent's sys.path; they must find tests.workers.handlers.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.workers.pool_probes import PATIENCE_S, all_idle  # noqa: E402 - needs ROOT on sys.path

HANDLER = "tests.workers.handlers:dispatch"
T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: starts TensorFlow in a worker (several seconds)")


class Driver:
    """Runs coroutines on one event loop shared by a module's tests (pools outlive a single test)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def __call__(self, coro: Coroutine[Any, Any, T], timeout: float = PATIENCE_S + 30.0) -> T:
        # Every test is bounded, with or without pytest-timeout; the waits inside give up first.
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def drive() -> Iterator[Driver]:
    driver = Driver()
    yield driver
    driver.loop.close()


@pytest.fixture(scope="module")
def make_pool(drive: Driver) -> Iterator[Callable[..., WorkerPool]]:
    """Start a pool of test-handler workers (closed at the end of the module)."""
    pools: list[WorkerPool] = []

    def make(*, ready: bool = True, **overrides: Any) -> WorkerPool:
        settings: dict[str, Any] = {"devices": ("cpu",), "handler": HANDLER, "warmup": None}
        settings.update(overrides)
        pool = WorkerPool(PoolConfig(**settings))
        pools.append(pool)
        drive(pool.start())
        if ready:
            drive(all_idle(pool))
        return pool

    yield make
    for pool in pools:
        drive(pool.close(grace_s=1.0))
