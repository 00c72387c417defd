"""Train-step jobs in the worker: k clipped optimizer steps of a model spec on one batch.

A step's graph takes the weights and optimizer state as inputs (one packed vector), assigns
them, steps and returns the new ones, so one call of one concrete function is the whole step, and
k steps feed each step's packed output to the next without leaving TensorFlow.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import tensorflow as tf

from service.engine.keras_program import (
    PROGRAMS,
    TF_DTYPES,
    ZERO,
    KerasProgram,
    as_dtype,
    build_model,
    empty,
    evaluation_errors,
    hyper_spec,
    hyperparameters,
    records,
    spec_of,
    spread,
    trainable_mask,
)
from service.engine.packing import assign_packed, pack, packed_spec, read_packed, unpack
from service.engine.programs import dense, trace
from service.jobs import TrainStepJob, TrainStepResult, check_train_step_job
from service.jobs.hyperparameters import clip_kind
from service.limits import Limits
from service.models import keras_build as kb
from service.models.layout import StateInfo, model_layout, optimizer_state_layout
from service.models.objectives import objective_loss

__all__ = ["run_train_step"]


@evaluation_errors()
def run_train_step(job: TrainStepJob, limits: Limits) -> TrainStepResult:
    layout = model_layout(job.model, limits)
    state_layout = optimizer_state_layout(job.optimizer, layout)
    check_train_step_job(job, layout, state_layout, limits)  # as the API did
    hyper = hyperparameters(job)
    program, cache = PROGRAMS.get_or_build(job.signature(), lambda: _compile(job, state_layout))
    dtype = np.dtype(job.dtype)
    weights = as_dtype(job.weights, program.fresh_weights, job.dtype)
    fresh_state = kb.fresh_optimizer_state(program.fresh_state, job.optimizer)  # Adagrad's start is the job's
    state = as_dtype(job.optimizer_state, fresh_state, job.dtype)
    start = time.perf_counter()
    # Converted once, not on every step of a k-step call.
    tensors = [
        tf.constant(np.asarray(job.x, dtype)),
        empty(job.dtype, (1,)) if job.y is None else tf.constant(np.asarray(job.y, dtype)),
        empty(job.dtype, (0,)) if job.actions is None else tf.constant(np.asarray(job.actions, dtype)),
        empty(job.dtype, (0,)) if job.returns is None else tf.constant(np.asarray(job.returns, dtype)),
    ]
    packed: Any = pack([*weights, *state], job.dtype)
    hyper_tensor = tf.constant(hyper)
    step = program.fns["step"]
    stacked: list[Any] = []
    grads: list[Any] = []
    for _ in range(job.steps):
        # Each step's packed output feeds the next as a tensor; only the last becomes a numpy array.
        record, grads, packed = step(*tensors, packed, hyper_tensor)
        stacked.append(record)
    history = records(stacked)
    arrays = unpack(packed.numpy(), [*program.fresh_weights, *program.fresh_state])
    count = len(program.fresh_weights)
    gradients = None
    if job.return_gradients:
        out = {f"grad/{i}": g.numpy() for i, g in enumerate(grads)}
        gradients = spread(out, "grad", trainable_mask(program.model), program.fresh_weights)
    return TrainStepResult(
        history=history,
        weights=arrays[:count],
        optimizer_state=arrays[count:],
        gradients=gradients,
        cache=cache,
        compute_ms=(time.perf_counter() - start) * 1000.0,
    )


def _compile(job: TrainStepJob, state_layout: tuple[StateInfo, ...]) -> KerasProgram:
    model, fresh, regularizers = build_model(job.model, job.dtype)
    tf_dtype = TF_DTYPES[job.dtype]
    trainable = list(model.trainable_weights)
    optimizer = kb.make_optimizer(job.optimizer)
    optimizer.build(trainable)
    state_variables = kb.optimizer_state_variables(optimizer, state_layout)
    fresh_state = kb.optimizer_state(optimizer, job.dtype)
    objective = objective_loss(job.objective, model, kb.make_loss(job.loss, job.dtype), tf_dtype)
    # get_weights() order, then the documented optimizer state order: the request's and response's lists.
    carried = list(model.weights) + state_variables
    iterations = optimizer.iterations
    seeded = [
        (layer.seed_generator.state, int(layer.seed if layer.seed is not None else 0))
        for layer in model.layers
        if getattr(layer, "seed_generator", None) is not None and hasattr(layer, "rate")
    ]

    clip = clip_kind(job.clip)
    kind = job.optimizer["type"]

    def step(
        x: Any, y: Any, actions: Any, returns: Any, packed: Any, hyper: Any
    ) -> tuple[Any, list[Any], Any]:
        # Automatic control dependencies order these by variable: load, then the step, then the reads.
        assign_packed(carried, packed)
        # Dropout masks depend on (layer seed, iteration) only, so a step is the same however it is batched.
        for state, seed in seeded:
            state.assign(tf.stack([tf.constant(seed, state.dtype), tf.cast(iterations, state.dtype)]))
        with kb.bind_hyperparameters(hyper, job.dtype, optimizer, kind, clip, regularizers) as threshold:
            with tf.GradientTape() as tape:
                data, reg = objective(x, y, actions, returns)
                total = data + reg
            grads = dense(tape.gradient(total, trainable, unconnected_gradients=ZERO))
            clipped = kb.apply_clip(grads, clip, threshold)
            optimizer.apply(clipped, trainable)
        norms = [tf.linalg.global_norm(grads), tf.linalg.global_norm(clipped)]
        record = tf.stack([tf.cast(q, tf_dtype) for q in [total, data, reg, *norms]])  # RECORD order
        return record, grads, read_packed(carried, tf_dtype)

    # Actions and returns (reinforce only; empty otherwise) take any length: one trace serves every batch.
    vector = tf.TensorSpec([None], tf_dtype)
    specs = [spec_of(job.x, tf_dtype), spec_of(job.y, tf_dtype), vector, vector]
    specs += [packed_spec(carried, tf_dtype), hyper_spec(job)]
    return KerasProgram(
        fns={"step": trace(step, specs)},
        model=model,
        optimizer=optimizer,
        fresh_weights=fresh,
        fresh_state=fresh_state,
    )
