"""What model gradients, train steps and expression steps compile to, and the pieces they share.

Each distinct job signature gets one ``KerasProgram`` (a Keras model or variables, an optimizer
and traced tf.functions), kept in ``PROGRAMS``. Every call loads the request's weights and
optimizer state into the program's variables first, so a program carries no state from one
request to the next: k calls of one step equal one call of k steps.

Hyper-parameters are inputs too (service/jobs/hyperparameters.py): a job's signature holds only
the optimizer's type and options, the clip kind and which regularizers exist, and the numbers
(learning rate, betas, clip threshold, L1/L2 strengths...) come in as one float64 vector per call.
A learning-rate schedule therefore compiles once and runs every later step from the cache.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from service.engine.programs import ProgramCache, error_message
from service.errors import EvaluationError, InvalidRequest
from service.jobs import ExpressionStepJob, ModelGradientJob, StepRecord, TrainStepJob
from service.jobs.hyperparameters import regularizer_slots
from service.models import keras_build as kb

__all__ = [
    "PROGRAMS",
    "TF_DTYPES",
    "RECORD",
    "ZERO",
    "KerasProgram",
    "as_dtype",
    "build_model",
    "empty",
    "evaluation_errors",
    "hyper_spec",
    "hyperparameters",
    "records",
    "spec_of",
    "spread",
    "trainable_mask",
]

ZERO = tf.UnconnectedGradients.ZERO
TF_DTYPES = {"float32": tf.float32, "float64": tf.float64}


@dataclass(slots=True)
class KerasProgram:
    """What one signature compiles to; ``fns`` are tf.functions closing over ``model``/``optimizer``."""

    fns: dict[str, Callable[..., Any]]
    model: Any = None
    optimizer: Any = None
    variables: list[Any] = field(default_factory=list)  # expression steps: one Keras variable per input
    fresh_weights: list[np.ndarray] = field(default_factory=list)
    fresh_state: list[np.ndarray] = field(default_factory=list)
    # Writes every weight (model gradients) in one call.
    load: Callable[..., Any] | None = None


# A model program holds a Keras model and a few graphs (~1-5 MB); 64 bounds a worker's memory.
PROGRAMS: ProgramCache[KerasProgram] = ProgramCache(int(os.environ.get("TAPESERVE_MODEL_CACHE_SIZE", "64")))


@contextlib.contextmanager
def evaluation_errors() -> Iterator[None]:
    """Values a valid program cannot take (a bad index...) are the request's EvaluationError."""
    try:
        yield
    except tf.errors.InvalidArgumentError as exc:
        message = error_message(str(exc), type(exc).__name__)
        raise EvaluationError(f"the computation failed for these values: {message}") from None


def as_dtype(values: list[np.ndarray] | None, fresh: list[np.ndarray], dtype: str) -> list[np.ndarray]:
    """``values`` (already checked against the layout) in ``dtype``, or ``fresh`` when None."""
    if values is None:
        return fresh
    return [np.asarray(v, dtype) for v in values]


def spec_of(array: np.ndarray | None, dtype: Any) -> tf.TensorSpec:
    # A free batch axis: one trace serves every batch size.
    shape = [1] if array is None else [None, *array.shape[1:]]
    return tf.TensorSpec(shape, dtype)


def build_model(spec: dict[str, Any], dtype: str) -> tuple[Any, list[np.ndarray], list[Any]]:
    """The model, its seeded weights and its regularizers (in the order of the hyper-parameter vector)."""
    made: dict[tuple[int, str], Any] = {}
    model = kb.build_model(spec, dtype, made)
    return model, kb.initial_weights(model), [made[slot] for slot in regularizer_slots(spec)]


def hyperparameters(job: ModelGradientJob | TrainStepJob | ExpressionStepJob) -> np.ndarray:
    """The job's run-time hyper-parameters (a float64 vector), refused unless all finite numbers."""
    try:
        values = job.hyperparameters()
    except (TypeError, ValueError):
        raise InvalidRequest("hyper-parameters (optimizer, clip, regularizers) must be numbers") from None
    if not np.all(np.isfinite(values)):
        raise InvalidRequest("hyper-parameters (optimizer, clip, regularizers) must be finite numbers")
    return values


def hyper_spec(job: ModelGradientJob | TrainStepJob | ExpressionStepJob) -> tf.TensorSpec:
    return tf.TensorSpec([len(job.hyperparameters())], tf.float64)


def trainable_mask(model: Any) -> list[bool]:
    trainable = {id(v) for v in model.trainable_weights}
    return [id(w) in trainable for w in model.weights]


def spread(
    out: dict[str, np.ndarray], prefix: str, mask: list[bool], like: list[np.ndarray]
) -> list[np.ndarray]:
    """Per-trainable-weight outputs laid out like get_weights(); non-trainable weights get zeros."""
    values: list[np.ndarray] = []
    k = 0
    for keep, ref in zip(mask, like, strict=True):
        if keep:
            values.append(out[f"{prefix}/{k}"])
            k += 1
        else:
            values.append(np.zeros_like(ref))
    return values


# The fields of a StepRecord, in the order a step graph stacks them.
RECORD = ("loss", "data_loss", "regularization_loss", "gradient_norm", "clipped_gradient_norm")


def records(stacked: list[Any]) -> list[StepRecord]:
    """Per-step records from the steps' stacked record tensors, read back in one transfer."""
    if not stacked:
        return []
    rows = (stacked[0].numpy()[None] if len(stacked) == 1 else tf.stack(stacked).numpy()).tolist()
    return [StepRecord(**dict(zip(RECORD, row, strict=True))) for row in rows]


@functools.cache
def empty(dtype: str, shape: tuple[int, ...]) -> Any:
    """The zeros passed for an input the objective does not use (made once: a conversion costs ~50 us)."""
    return tf.zeros(shape, TF_DTYPES[dtype])
