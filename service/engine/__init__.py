"""Tape programs: plain jobs in, plain results out. No FastAPI, no pydantic.

``execute`` imports TensorFlow on first use; only worker processes call it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.engine.jobs import DERIVATIVES, GradientJob, GradientResult, Job, Result, StackedGradientJob

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
    # TensorFlow is imported here, in the worker only.
    if isinstance(job, GradientJob | StackedGradientJob):
        from service.engine.runner import run

        result: Result | list[GradientResult] = run(job, limits)
        return result
    from service.engine.training import run_training_job

    return run_training_job(job, limits)


def after_reply() -> None:
    """Deferred work (building numpy plans) the worker runs once a job's reply is on its way."""
    import sys

    runner = sys.modules.get("service.engine.runner")  # nothing to do if no job ever ran
    if runner is not None:
        runner.after_reply()
