"""Tape programs: plain jobs in, plain results out. No FastAPI, no pydantic.

``execute`` imports TensorFlow on first use; only worker processes call it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.engine.jobs import DERIVATIVES, GradientJob, GradientResult, Job, Result, StackedGradientJob
from service.errors import MemoryLimitExceeded

if TYPE_CHECKING:
    from service.limits import Limits

__all__ = [
    "DERIVATIVES",
    "GradientJob",
    "GradientResult",
    "Job",
    "Result",
    "StackedGradientJob",
    "after_reply",
    "execute",
]


def execute(job: Job | StackedGradientJob, limits: Limits | None = None) -> Result | list[GradientResult]:
    """Run one job to its result (raises service.errors.TapeserveError for user errors).

    A StackedGradientJob (dynamic batching) gives one GradientResult per stacked job.
    """
    try:
        # TensorFlow is imported here, in the worker only.
        if isinstance(job, GradientJob | StackedGradientJob):
            from service.engine.runner import run

            result: Result | list[GradientResult] = run(job, limits)
            return result
        from service.engine.training import run_training_job

        return run_training_job(job, limits)
    except Exception as exc:
        # TF's allocator fails a tensor as ResourceExhaustedError (CPU past the worker's memory
        # ceiling, or a GPU's memory); numpy and Python raise MemoryError. Either is this job's size.
        if isinstance(exc, MemoryError) or type(exc).__name__ == "ResourceExhaustedError":
            raise MemoryLimitExceeded(
                "the computation needed more memory than a worker may use; ask for less at once "
                "(smaller inputs, fewer derivatives, or split the batch)"
            ) from None
        raise


def after_reply() -> None:
    """Deferred work (building numpy plans) the worker runs once a job's reply is on its way."""
    import sys

    runner = sys.modules.get("service.engine.runner")  # nothing to do if no job ever ran
    if runner is not None:
        runner.after_reply()
