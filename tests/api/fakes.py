"""A stand-in for the worker pool, for tests about the API process alone."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import numpy as np

from service.errors import Timeout
from service.jobs import GradientJob, GradientResult
from service.limits import Limits

__all__ = ["FakePool", "InlinePool"]


class FakePool:
    """Stands in for WorkerPool: records jobs; answers with zeros of the right shapes, or raises ``error``."""

    def __init__(self) -> None:
        self.jobs: list[GradientJob] = []
        self.calls: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.is_ready = True
        self.started = False
        self.closed = False

    @property
    def ready(self) -> bool:
        return self.is_ready

    @property
    def idle_workers(self) -> int:
        return 1

    async def start(self) -> None:
        self.started = True

    async def close(self, grace_s: float | None = None) -> None:
        self.closed = True

    def status(self) -> dict[str, Any]:
        return {"workers": [{"id": 0, "device": "cpu", "state": "fake"}], "queue_depth": 0, "in_flight": 0}

    async def run(self, job: Any, *, timeout_s: float | None = None, affinity: str | None = None) -> Any:
        self.jobs.append(job)
        self.calls.append({"timeout_s": timeout_s, "affinity": affinity})
        if self.error is not None:
            raise self.error
        zeros = {name: np.zeros_like(value) for name, value in job.variables.items()}
        wanted = set(job.derivatives)
        return GradientResult(
            value=np.asarray(0.0, dtype=job.dtype),
            gradient=zeros if "gradient" in wanted else None,
            jacobian=zeros if "jacobian" in wanted else None,
            hessian={a: {b: np.zeros(x.shape + y.shape) for b, y in zeros.items()} for a, x in zeros.items()}
            if "hessian" in wanted
            else None,
            hvp=zeros if "hvp" in wanted else None,
            jvp=np.asarray(0.0) if "jvp" in wanted else None,
            vjp=zeros if "vjp" in wanted else None,
            cache="miss",
            compute_ms=0.5,
        )


class InlinePool:
    """The pool's contract with the real engine run in this process (in a thread); jobs and results
    are pickled both ways, as the real pool carries them."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.fail_on_call: int | None = None  # raise Timeout on this call (1-based), for mid-stream errors
        self.calls = 0

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self, grace_s: float | None = None) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"workers": [], "queue_depth": 0, "in_flight": 0}

    async def run(self, job: Any, *, timeout_s: float | None = None, affinity: str | None = None) -> Any:
        from service.engine import execute  # TensorFlow, only for the tests that use this pool

        self.calls += 1
        if self.fail_on_call == self.calls:
            raise Timeout("the computation passed its deadline of 1 s")
        assert affinity == job.signature()

        def work() -> Any:
            result = execute(pickle.loads(pickle.dumps(job, protocol=5)), self.limits)  # noqa: S301 (our own job)
            return pickle.loads(pickle.dumps(result, protocol=5))  # noqa: S301 (our own result)

        return await asyncio.to_thread(work)
