"""Expression-step jobs in the worker: k clipped optimizer steps minimizing a scalar expression.

The expression's variables become Keras variables an optimizer updates; like a train step, one
traced call loads them and the optimizer state from one packed vector, steps and reads them back.
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
    evaluation_errors,
    hyper_spec,
    hyperparameters,
    records,
)
from service.engine.packing import assign_packed, pack, packed_spec, read_packed, unpack
from service.engine.programs import dense, trace
from service.errors import ShapeError
from service.expr.compiler import Compiler
from service.expr.program import build_program
from service.jobs import ExpressionStepJob, ExpressionStepResult, check_expression_step_job, loop_counts
from service.jobs.hyperparameters import clip_kind
from service.limits import Limits
from service.models import keras_build as kb
from service.models.layout import StateInfo, optimizer_state_layout, variables_layout

__all__ = ["run_expression_step"]


@evaluation_errors()
def run_expression_step(job: ExpressionStepJob, limits: Limits) -> ExpressionStepResult:
    state_layout = optimizer_state_layout(job.optimizer, variables_layout(job.variables))
    check_expression_step_job(job, state_layout, limits)  # as the API did
    hyper = hyperparameters(job)
    program, cache = PROGRAMS.get_or_build(job.signature(), lambda: _compile(job, state_layout, limits))
    dtype = np.dtype(job.dtype)
    fresh_state = kb.fresh_optimizer_state(program.fresh_state, job.optimizer)  # Adagrad's start is the job's
    state = as_dtype(job.optimizer_state, fresh_state, job.dtype)
    constants = [tf.constant(np.asarray(job.constants[name], dtype)) for name in job.constants]
    variables = [np.asarray(job.variables[name], dtype) for name in job.variables]
    packed: Any = pack([*variables, *state], job.dtype)
    hyper_tensor = tf.constant(hyper)
    start = time.perf_counter()
    step = program.fns["step"]
    stacked: list[Any] = []
    for _ in range(job.steps):
        record, packed = step(*constants, packed, hyper_tensor)
        stacked.append(record)
    history = records(stacked)
    arrays = unpack(packed.numpy(), [*variables, *state])
    count = len(variables)
    return ExpressionStepResult(
        history=history,
        variables=dict(zip(job.variables, arrays[:count], strict=True)),
        optimizer_state=arrays[count:],
        cache=cache,
        compute_ms=(time.perf_counter() - start) * 1000.0,
    )


def _compile(job: ExpressionStepJob, state_layout: tuple[StateInfo, ...], limits: Limits) -> KerasProgram:
    program = build_program(job.expression, list(job.variables), list(job.constants), job.functions, limits)
    counts = loop_counts(job.constants, job.counts)
    tf_dtype = TF_DTYPES[job.dtype]
    names = list(job.variables)
    const_names = list(job.constants)
    variables = kb.make_variables([job.variables[name].shape for name in names], job.dtype)
    optimizer = kb.make_optimizer(job.optimizer)
    optimizer.build(variables)
    fresh_state = kb.optimizer_state(optimizer, job.dtype)

    carried = [*variables, *kb.optimizer_state_variables(optimizer, state_layout)]
    clip = clip_kind(job.clip)
    kind = job.optimizer["type"]

    def step(*inputs: Any) -> tuple[Any, Any]:
        *constants, packed, hyper = inputs
        assign_packed(carried, packed)  # then the step, then the reads (automatic control dependencies)
        with tf.GradientTape() as tape:
            env = {name: v.value for name, v in zip(names, variables, strict=True)}
            env |= dict(zip(const_names, constants, strict=True))
            value = Compiler(program, tf_dtype, limits, counts=counts).evaluate(env)
            if value.shape.rank != 0:
                raise ShapeError(
                    f"a step minimizes a scalar; the expression has shape {list(value.shape)} "
                    "(reduce it, e.g. sum(...))",
                    field="expression",
                )
        grads = dense(tape.gradient(value, [v.value for v in variables], unconnected_gradients=ZERO))
        with kb.bind_hyperparameters(hyper, job.dtype, optimizer, kind, clip) as threshold:
            clipped = kb.apply_clip(grads, clip, threshold)
            optimizer.apply(clipped, variables)
        norms = [tf.linalg.global_norm(grads), tf.linalg.global_norm(clipped)]
        record = tf.stack([tf.cast(q, tf_dtype) for q in [value, value, tf.zeros([], tf_dtype), *norms]])
        return record, read_packed(carried, tf_dtype)

    specs = [tf.TensorSpec(job.constants[name].shape, tf_dtype) for name in const_names]
    specs += [packed_spec(carried, tf_dtype), hyper_spec(job)]
    return KerasProgram(
        fns={"step": trace(step, specs)}, optimizer=optimizer, variables=variables, fresh_state=fresh_state
    )
