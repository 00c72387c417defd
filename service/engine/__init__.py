"""Tape programs: plain jobs in, plain results out. No FastAPI, no pydantic.

``execute`` imports TensorFlow on first use; only worker processes call it. The jobs and results
themselves live in ``service.jobs``. One module per job kind: ``runner`` (expression gradients),
``model_gradient``, ``train_step``, ``expression_step``; what they share is in ``programs``
(the program cache, tracing, error text), ``packing`` (variables in one flat vector) and
``keras_program`` (what the Keras-backed kinds compile to).
"""

from __future__ import annotations

from service.errors import InvalidRequest, MemoryLimitExceeded
from service.jobs import (
    ExpressionStepJob,
    GradientJob,
    GradientResult,
    Job,
    ModelGradientJob,
    Result,
    StackedGradientJob,
    TrainStepJob,
)
from service.limits import Limits

__all__ = ["after_reply", "execute"]


def execute(job: Job | StackedGradientJob, limits: Limits | None = None) -> Result | list[GradientResult]:
    """Run one job to its result (raises service.errors.TapeserveError for user errors).

    A StackedGradientJob (dynamic batching) gives one GradientResult per stacked job.
    """
    limits = limits or Limits()
    try:
        # TensorFlow is imported here, in the worker only: each job kind's module on its first job.
        if isinstance(job, GradientJob | StackedGradientJob):
            from service.engine.runner import run

            result: Result | list[GradientResult] = run(job, limits)
            return result
        if isinstance(job, ModelGradientJob):
            from service.engine.model_gradient import run_model_gradient

            return run_model_gradient(job, limits)
        if isinstance(job, TrainStepJob):
            from service.engine.train_step import run_train_step

            return run_train_step(job, limits)
        if isinstance(job, ExpressionStepJob):
            from service.engine.expression_step import run_expression_step

            return run_expression_step(job, limits)
        raise InvalidRequest(f"unknown job type {type(job).__name__}")
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
