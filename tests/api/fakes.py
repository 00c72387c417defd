"""A stand-in for the worker pool, for tests about the API process alone."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.engine.jobs import GradientJob, GradientResult

__all__ = ["FakePool"]


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
