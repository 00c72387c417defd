"""Tape programs: plain jobs in, plain results out. No FastAPI, no pydantic.

``execute`` imports TensorFlow on first use; only worker processes call it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.engine.jobs import DERIVATIVES, GradientJob, GradientResult, Job, Result

if TYPE_CHECKING:
    from service.limits import Limits

__all__ = ["DERIVATIVES", "GradientJob", "GradientResult", "Job", "Result", "execute"]


def execute(job: Job, limits: Limits | None = None) -> Result:
    """Run one job to its result (raises service.errors.TapeserveError for user errors)."""
    from service.engine.runner import run  # TensorFlow is imported here, in the worker only

    return run(job, limits)
