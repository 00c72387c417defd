"""Jobs and results exchanged between the API and the workers, and ONE TF-free validation per kind.

Plain data: numpy arrays and Python values, no TensorFlow, no pydantic. The API builds a job and
checks it to refuse a request early; the worker pool carries it to a worker process (small arrays
packed, ``packing``); the engine checks it again (defence in depth) and turns it into its result.
This package imports only the base modules (errors, limits): models, expr, engine, workers and
the API all sit above it.

- ``gradient``: GradientJob / GradientResult / StackedGradientJob and their checks;
- ``model``: model gradient, train-step and expression-step jobs and results and their checks;
- ``hyperparameters``: which numbers of a job shape its compiled program (its signature) and which
  are fed to it on every call;
- ``functions``: user functions in the form jobs carry them;
- ``counts``: request constants used as loop step counts (their values are in a job's signature).
"""

from service.jobs.counts import loop_counts
from service.jobs.functions import job_functions
from service.jobs.gradient import (
    DERIVATIVES,
    GradientJob,
    GradientResult,
    StackedGradientJob,
    check_gradient_arrays,
    check_gradient_job,
    check_gradient_names,
)
from service.jobs.model import (
    ExpressionStepJob,
    ExpressionStepResult,
    ModelGradientJob,
    ModelGradientResult,
    StepRecord,
    TrainStepJob,
    TrainStepResult,
    check_expression_step_job,
    check_input_count,
    check_model_gradient_job,
    check_optimizer_state,
    check_steps,
    check_tensors,
    check_train_step_job,
)

Job = GradientJob | ModelGradientJob | TrainStepJob | ExpressionStepJob
Result = GradientResult | ModelGradientResult | TrainStepResult | ExpressionStepResult

__all__ = [
    "DERIVATIVES",
    "ExpressionStepJob",
    "ExpressionStepResult",
    "GradientJob",
    "GradientResult",
    "Job",
    "ModelGradientJob",
    "ModelGradientResult",
    "Result",
    "StackedGradientJob",
    "StepRecord",
    "TrainStepJob",
    "TrainStepResult",
    "check_expression_step_job",
    "check_gradient_arrays",
    "check_gradient_job",
    "check_gradient_names",
    "check_input_count",
    "check_model_gradient_job",
    "check_optimizer_state",
    "check_steps",
    "check_tensors",
    "check_train_step_job",
    "job_functions",
    "loop_counts",
]
