"""Model gradient jobs in the worker: loss, weight and input gradients, HVP, saliency, adversarial x.

One compiled program per signature (``keras_program.PROGRAMS``): the Keras model, a traced main
function (loss and every requested derivative from one forward pass under nested tapes) and, for
attacks, a traced input gradient. The request's weights are loaded in one traced call first.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
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
    evaluation_errors,
    hyper_spec,
    hyperparameters,
    spec_of,
    spread,
    trainable_mask,
)
from service.engine.packing import assigner, pack
from service.engine.programs import dense, trace
from service.jobs import ModelGradientJob, ModelGradientResult, check_model_gradient_job
from service.limits import Limits
from service.models import keras_build as kb
from service.models.layout import model_layout
from service.models.objectives import regularization_loss

__all__ = ["run_model_gradient"]


@evaluation_errors()
def run_model_gradient(job: ModelGradientJob, limits: Limits) -> ModelGradientResult:
    check_model_gradient_job(job, model_layout(job.model, limits), limits)  # as the API did
    hyper = hyperparameters(job)
    program, cache = PROGRAMS.get_or_build(job.signature(), lambda: _compile(job))
    assert program.load is not None
    program.load(pack(as_dtype(job.weights, program.fresh_weights, job.dtype), job.dtype))
    dtype = np.dtype(job.dtype)
    x = np.asarray(job.x, dtype)
    y = np.zeros([1], dtype) if job.y is None else np.asarray(job.y, dtype)
    start = time.perf_counter()
    args: list[Any] = [x, y, hyper]
    mask = trainable_mask(program.model)
    if job.tangents is not None:
        args += [np.asarray(t, dtype) for t, keep in zip(job.tangents, mask, strict=True) if keep]
    out = {k: v.numpy() for k, v in program.fns["main"](*args).items()}
    result = ModelGradientResult(
        loss=float(out["loss"]),
        data_loss=float(out["data_loss"]),
        regularization_loss=float(out["regularization_loss"]),
    )
    if job.weights is None:
        result.weights = [np.asarray(w) for w in program.fresh_weights]
    if "weights" in job.wrt:
        result.weight_gradients = spread(out, "grad", mask, program.fresh_weights)
    if "inputs" in job.wrt:
        result.input_gradients = out["input_grad"]
    if job.saliency:
        result.saliency = out["saliency"]
    if job.tangents is not None:
        result.hvp = spread(out, "hvp", mask, program.fresh_weights)
    if job.adversarial is not None:
        result.x_adv, result.adversarial_loss = _attack(program.fns["input_grad"], x, y, job.adversarial)
    result.cache = cache
    result.compute_ms = (time.perf_counter() - start) * 1000.0
    return result


def _compile(job: ModelGradientJob) -> KerasProgram:
    model, fresh, regularizers = build_model(job.model, job.dtype)
    tf_dtype = TF_DTYPES[job.dtype]
    loss_fn = kb.make_loss(job.loss, job.dtype)
    per_example = kb.make_loss(job.loss, job.dtype, reduction=None)
    trainable = list(model.trainable_weights)
    with_inputs = "inputs" in job.wrt or job.saliency
    hvp = job.tangents is not None

    def main(x: Any, y: Any, hyper: Any, *tangents: Any) -> dict[str, Any]:
        # A second tape only for an HVP, and a persistent inner tape only when it takes more than
        # one gradient: a tape that records the gradient of a recurrent layer's while loop makes the
        # loop's gradient differentiable again (accumulators for every intermediate), which tripled
        # the tracing time of LSTM, GRU and SimpleRNN models (LSTM, 8 steps: 1.6 -> 0.26 s).
        outer: Any = tf.GradientTape() if hvp else contextlib.nullcontext()
        with kb.bind_hyperparameters(hyper, job.dtype, regularizers=regularizers), outer:
            with tf.GradientTape(persistent=with_inputs) as tape:
                if with_inputs:
                    tape.watch(x)
                out = model(x, training=job.training)
                data = tf.cast(loss_fn(y, out), tf_dtype)
                reg = regularization_loss(model, tf_dtype)
                total = data + reg
                # Summed inside the tape: a target computed outside it would have no recorded path.
                per = tf.reduce_sum(tf.cast(per_example(y, out), tf_dtype)) if job.saliency else None
            grads = dense(tape.gradient(total, trainable, unconnected_gradients=ZERO))
        result: dict[str, Any] = {"loss": total, "data_loss": data, "regularization_loss": reg}
        for i, g in enumerate(grads):
            result[f"grad/{i}"] = g
        if "inputs" in job.wrt:
            result["input_grad"] = tape.gradient(total, x, unconnected_gradients=ZERO)
        if job.saliency:
            # Examples are independent in inference mode, so d(sum of per-example losses)/dx_i is
            # example i's own input gradient.
            result["saliency"] = tape.gradient(per, x, unconnected_gradients=ZERO)
        if hvp:
            products = dense(
                outer.gradient(grads, trainable, output_gradients=list(tangents), unconnected_gradients=ZERO)
            )
            for i, h in enumerate(products):
                result[f"hvp/{i}"] = h
        return result

    def input_grad(x: Any, y: Any) -> dict[str, Any]:
        with tf.GradientTape() as tape:
            tape.watch(x)
            data = tf.cast(loss_fn(y, model(x, training=False)), tf_dtype)
        return {"loss": data, "grad": tape.gradient(data, x, unconnected_gradients=ZERO)}

    x_spec = spec_of(job.x, tf_dtype)
    y_spec = spec_of(job.y, tf_dtype)
    specs = [x_spec, y_spec, hyper_spec(job)]
    if hvp:
        specs += [tf.TensorSpec(w.shape, tf_dtype) for w in trainable]
    fns = {"main": trace(main, specs)}
    if job.adversarial is not None:
        fns["input_grad"] = trace(input_grad, [x_spec, y_spec])
    return KerasProgram(
        fns=fns, model=model, fresh_weights=fresh, load=assigner(list(model.weights), tf_dtype)
    )


def _attack(
    input_grad: Callable[..., Any], x: np.ndarray, y: np.ndarray, config: dict[str, Any]
) -> tuple[np.ndarray, float]:
    """FGSM or PGD from the gradient of the loss with respect to the INPUTS (L-infinity ball of epsilon)."""
    eps = float(config["epsilon"])
    low, high = config.get("clip_min"), config.get("clip_max")

    def domain(a: np.ndarray) -> np.ndarray:
        if low is not None or high is not None:
            a = np.clip(a, low, high)
        return a

    if config["method"] == "fgsm":
        g = input_grad(x, y)["grad"].numpy()
        x_adv = domain(x + eps * np.sign(g)).astype(x.dtype)
    else:
        step_size = float(config.get("step_size") or eps / 4)
        x_adv = x.copy()
        for _ in range(int(config.get("steps") or 10)):
            g = input_grad(x_adv, y)["grad"].numpy()
            x_adv = domain(np.clip(x_adv + step_size * np.sign(g), x - eps, x + eps)).astype(x.dtype)
    return x_adv, float(input_grad(x_adv, y)["loss"].numpy())
