"""Model and step jobs in the worker: model gradients, clipped training steps, expression steps.

Each distinct job signature gets one compiled program (a Keras model or variables, an optimizer
and traced tf.functions) kept in a bounded LRU like the expression programs. Every call loads the
request's weights and optimizer state into the program's variables first, so a program carries no
state from one request to the next: k calls of one step equal one call of k steps.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from service.engine.jobs import (
    ExpressionStepJob,
    ExpressionStepResult,
    ModelGradientJob,
    ModelGradientResult,
    StepRecord,
    TrainStepJob,
    TrainStepResult,
)
from service.errors import EvaluationError, InvalidRequest, NotDifferentiable, ShapeError, TapeserveError
from service.expr.compiler import Compiler
from service.expr.program import build_program
from service.limits import Limits
from service.models import keras_build as kb
from service.models.layout import model_layout

__all__ = ["cache_info", "run_training_job"]

import keras

_ZERO = tf.UnconnectedGradients.ZERO
_TF_DTYPES = {"float32": tf.float32, "float64": tf.float64}


@dataclass(slots=True)
class _Program:
    """What one signature compiles to; ``fns`` are tf.functions closing over ``model``/``optimizer``."""

    fns: dict[str, Callable[..., Any]]
    model: Any = None
    optimizer: Any = None
    variables: list[Any] = field(default_factory=list)  # expression steps: one Keras variable per input
    fresh_weights: list[np.ndarray] = field(default_factory=list)
    fresh_state: list[np.ndarray] = field(default_factory=list)
    seeded: list[tuple[Any, int]] = field(default_factory=list)  # (seed generator, layer seed)


class _Cache:
    """A bounded LRU of compiled programs; evicting one frees its model, optimizer and graphs."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self.entries: OrderedDict[str, _Program] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get_or_build(self, key: str, build: Callable[[], _Program]) -> tuple[_Program, str]:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            self.hits += 1
            return entry, "hit"
        self.misses += 1
        entry = build()
        self.entries[key] = entry
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return entry, "miss"


# A model program holds a Keras model and a few graphs (~1-5 MB); 64 bounds a worker's memory.
_CACHE = _Cache(int(os.environ.get("TAPESERVE_MODEL_CACHE_SIZE", "64")))


def cache_info() -> dict[str, int]:
    return {
        "size": len(_CACHE.entries),
        "capacity": _CACHE.size,
        "hits": _CACHE.hits,
        "misses": _CACHE.misses,
    }


def run_training_job(
    job: Any, limits: Limits | None = None
) -> ModelGradientResult | TrainStepResult | ExpressionStepResult:
    """The result of a ModelGradientJob, TrainStepJob or ExpressionStepJob."""
    limits = limits or Limits()
    try:
        if isinstance(job, ModelGradientJob):
            return _model_gradient(job, limits)
        if isinstance(job, TrainStepJob):
            return _train_step(job, limits)
        if isinstance(job, ExpressionStepJob):
            return _expression_step(job, limits)
    except tf.errors.InvalidArgumentError as exc:
        raise EvaluationError(f"the computation failed for these values: {_message(exc)}") from None
    raise InvalidRequest(f"unknown job type {type(job).__name__}")


def _message(exc: BaseException) -> str:
    noise = ("File ", "Graph execution error", "Detected at node", "[[", "Traceback")
    lines = [ln.strip() for ln in str(exc).splitlines()]
    useful = [ln for ln in lines if ln and not ln.startswith(noise)]
    return (useful[-1] if useful else type(exc).__name__)[:300]


def _trace(fn: Callable[..., Any], specs: list[tf.TensorSpec]) -> Callable[..., Any]:
    """A tf.function traced now, so build errors surface as 4xx before any step runs."""
    traced = tf.function(fn, input_signature=specs, autograph=False)
    try:
        traced.get_concrete_function()
    except TapeserveError:
        raise
    except LookupError as exc:
        raise NotDifferentiable(f"an operation has no gradient: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise ShapeError(f"the model could not be built for these inputs: {_message(exc)}") from None
    return traced  # type: ignore[no-any-return]


def _spec_of(array: np.ndarray | None, dtype: Any) -> tf.TensorSpec:
    # A free batch axis: one trace serves every batch size.
    shape = [1] if array is None else [None, *array.shape[1:]]
    return tf.TensorSpec(shape, dtype)


def _build_model(spec: dict[str, Any], dtype: str, limits: Limits) -> tuple[Any, list[np.ndarray]]:
    model_layout(spec, limits)  # the same checks as the API, in case a job comes from elsewhere
    model = kb.build_model(spec, dtype)
    return model, kb.initial_weights(model)


def _load_weights(program: _Program, weights: list[np.ndarray] | None, dtype: str) -> None:
    values = program.fresh_weights if weights is None else weights
    layout = [tuple(w.shape) for w in program.fresh_weights]
    if len(values) != len(layout):
        raise ShapeError(f"weights has {len(values)} tensors; this model has {len(layout)}", field="weights")
    for i, (value, shape) in enumerate(zip(values, layout, strict=True)):
        if tuple(value.shape) != shape:
            raise ShapeError(
                f"weights[{i}] has shape {list(value.shape)}; it must be {list(shape)}", field=f"weights[{i}]"
            )
    program.model.set_weights([np.asarray(v, dtype) for v in values])


def _dense(grads: list[Any]) -> list[Any]:
    """Embedding gradients come as IndexedSlices; clients get (and clipping sees) dense tensors."""
    return [tf.convert_to_tensor(g) for g in grads]


def _losses(model: Any, dtype: Any) -> Any:
    losses = model.losses
    if not losses:
        return tf.zeros([], dtype)
    return tf.add_n([tf.cast(v, dtype) for v in losses])


# --- model gradients


def _model_gradient(job: ModelGradientJob, limits: Limits) -> ModelGradientResult:
    program, cache = _CACHE.get_or_build(job.signature(), lambda: _compile_gradient(job, limits))
    _load_weights(program, job.weights, job.dtype)
    dtype = np.dtype(job.dtype)
    x = np.asarray(job.x, dtype)
    y = np.zeros([1], dtype) if job.y is None else np.asarray(job.y, dtype)
    start = time.perf_counter()
    args: list[Any] = [x, y]
    if job.tangents is not None:
        trainable = _trainable_mask(program.model)
        args += [np.asarray(t, dtype) for t, keep in zip(job.tangents, trainable, strict=True) if keep]
    out = {k: v.numpy() for k, v in program.fns["main"](*args).items()}
    result = ModelGradientResult(
        loss=float(out["loss"]),
        data_loss=float(out["data_loss"]),
        regularization_loss=float(out["regularization_loss"]),
    )
    if job.weights is None:
        result.weights = [np.asarray(w) for w in program.fresh_weights]
    mask = _trainable_mask(program.model)
    if "weights" in job.wrt:
        result.weight_gradients = _spread(out, "grad", mask, program.fresh_weights)
    if "inputs" in job.wrt:
        result.input_gradients = out["input_grad"]
    if job.saliency:
        result.saliency = out["saliency"]
    if job.tangents is not None:
        result.hvp = _spread(out, "hvp", mask, program.fresh_weights)
    if job.adversarial is not None:
        result.x_adv, result.adversarial_loss = _attack(program.fns["input_grad"], x, y, job.adversarial)
    result.cache = cache
    result.compute_ms = (time.perf_counter() - start) * 1000.0
    return result


def _trainable_mask(model: Any) -> list[bool]:
    trainable = {id(v) for v in model.trainable_weights}
    return [id(w) in trainable for w in model.weights]


def _spread(
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


def _compile_gradient(job: ModelGradientJob, limits: Limits) -> _Program:
    model, fresh = _build_model(job.model, job.dtype, limits)
    tf_dtype = _TF_DTYPES[job.dtype]
    loss_fn = kb.make_loss(job.loss, job.dtype)
    per_example = kb.make_loss(job.loss, job.dtype, reduction=None)
    trainable = list(model.trainable_weights)
    with_inputs = "inputs" in job.wrt or job.saliency
    hvp = job.tangents is not None

    def main(x: Any, y: Any, *tangents: Any) -> dict[str, Any]:
        with tf.GradientTape(persistent=True) as outer:
            with tf.GradientTape(persistent=True) as tape:
                if with_inputs:
                    tape.watch(x)
                out = model(x, training=job.training)
                data = tf.cast(loss_fn(y, out), tf_dtype)
                reg = _losses(model, tf_dtype)
                total = data + reg
                # Summed inside the tape: a target computed outside it would have no recorded path.
                per = tf.reduce_sum(tf.cast(per_example(y, out), tf_dtype)) if job.saliency else None
            grads = _dense(tape.gradient(total, trainable, unconnected_gradients=_ZERO))
        result: dict[str, Any] = {"loss": total, "data_loss": data, "regularization_loss": reg}
        for i, g in enumerate(grads):
            result[f"grad/{i}"] = g
        if "inputs" in job.wrt:
            result["input_grad"] = tape.gradient(total, x, unconnected_gradients=_ZERO)
        if job.saliency:
            # Examples are independent in inference mode, so d(sum of per-example losses)/dx_i is
            # example i's own input gradient.
            result["saliency"] = tape.gradient(per, x, unconnected_gradients=_ZERO)
        if hvp:
            products = outer.gradient(
                grads, trainable, output_gradients=list(tangents), unconnected_gradients=_ZERO
            )
            for i, h in enumerate(products):
                result[f"hvp/{i}"] = h
        return result

    def input_grad(x: Any, y: Any) -> dict[str, Any]:
        with tf.GradientTape() as tape:
            tape.watch(x)
            data = tf.cast(loss_fn(y, model(x, training=False)), tf_dtype)
        return {"loss": data, "grad": tape.gradient(data, x, unconnected_gradients=_ZERO)}

    x_spec = _spec_of(job.x, tf_dtype)
    y_spec = _spec_of(job.y, tf_dtype)
    specs = [x_spec, y_spec]
    if hvp:
        specs += [tf.TensorSpec(w.shape, tf_dtype) for w in trainable]
    fns = {"main": _trace(main, specs)}
    if job.adversarial is not None:
        fns["input_grad"] = _trace(input_grad, [x_spec, y_spec])
    return _Program(fns=fns, model=model, fresh_weights=fresh)


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


# --- training steps


def _objective_loss(
    job: TrainStepJob, model: Any, loss_fn: Any, tf_dtype: Any
) -> Callable[[Any, Any, Any, Any], tuple[Any, Any]]:
    """(x, y, actions, returns) -> (data_loss, regularization_loss) for the job's objective."""
    objective = job.objective
    kind = objective["type"]

    if kind == "supervised":

        def supervised(x: Any, y: Any, actions: Any, returns: Any) -> tuple[Any, Any]:
            data = tf.cast(loss_fn(y, model(x, training=True)), tf_dtype)
            return data, _losses(model, tf_dtype)

        return supervised

    if kind == "adversarial":
        eps = float(objective["epsilon"])
        ratio = float(objective["ratio"])

        def adversarial(x: Any, y: Any, actions: Any, returns: Any) -> tuple[Any, Any]:
            # The attack sees the model in inference mode; its gradient is w.r.t. the inputs, not the weights.
            with tf.GradientTape() as attack:
                attack.watch(x)
                attack_loss = loss_fn(y, model(x, training=False))
            x_adv = tf.stop_gradient(x + eps * tf.sign(attack.gradient(attack_loss, x)))
            clean = tf.cast(loss_fn(y, model(x, training=True)), tf_dtype)
            reg = _losses(model, tf_dtype)
            adv = tf.cast(loss_fn(y, model(x_adv, training=True)), tf_dtype)
            return (1.0 - ratio) * clean + ratio * adv, reg

        return adversarial

    beta = float(objective["entropy_coefficient"])
    baseline = objective["baseline"]
    from_logits = bool(objective["from_logits"])

    def reinforce(x: Any, y: Any, actions: Any, returns: Any) -> tuple[Any, Any]:
        out = tf.cast(model(x, training=True), tf_dtype)
        logp = (
            tf.nn.log_softmax(out) if from_logits else tf.math.log(tf.maximum(out, tf.cast(1e-12, tf_dtype)))
        )
        chosen = tf.gather(logp, tf.cast(actions, tf.int32), axis=1, batch_dims=1)
        if baseline == "mean":
            b = tf.reduce_mean(returns)
        else:
            b = tf.cast(float(baseline or 0.0), tf_dtype)
        advantage = tf.stop_gradient(returns - b)
        entropy = -tf.reduce_sum(tf.exp(logp) * logp, axis=-1)
        data = -tf.reduce_mean(chosen * advantage) - beta * tf.reduce_mean(entropy)
        return data, _losses(model, tf_dtype)

    return reinforce


def _compile_step(job: TrainStepJob, limits: Limits) -> _Program:
    model, fresh = _build_model(job.model, job.dtype, limits)
    tf_dtype = _TF_DTYPES[job.dtype]
    trainable = list(model.trainable_weights)
    optimizer = kb.make_optimizer(job.optimizer)
    optimizer.build(trainable)
    fresh_state = kb.optimizer_state(optimizer, job.dtype)
    objective = _objective_loss(job, model, kb.make_loss(job.loss, job.dtype), tf_dtype)

    def step(x: Any, y: Any, actions: Any, returns: Any) -> dict[str, Any]:
        with tf.GradientTape() as tape:
            data, reg = objective(x, y, actions, returns)
            total = data + reg
        grads = _dense(tape.gradient(total, trainable, unconnected_gradients=_ZERO))
        clipped = kb.apply_clip(grads, job.clip)
        optimizer.apply(clipped, trainable)
        out = {
            "loss": total,
            "data_loss": data,
            "regularization_loss": reg,
            "gradient_norm": tf.linalg.global_norm(grads),
            "clipped_gradient_norm": tf.linalg.global_norm(clipped),
        }
        for i, g in enumerate(grads):
            out[f"grad/{i}"] = g
        return out

    n = job.x.shape[0]
    vector = tf.TensorSpec([None], tf_dtype)
    specs = [
        _spec_of(job.x, tf_dtype),
        _spec_of(job.y, tf_dtype),
        vector if job.actions is not None else tf.TensorSpec([n if n else None], tf_dtype),
        vector if job.returns is not None else tf.TensorSpec([n if n else None], tf_dtype),
    ]
    seeded = [
        (layer.seed_generator, int(layer.seed if layer.seed is not None else 0))
        for layer in model.layers
        if getattr(layer, "seed_generator", None) is not None and hasattr(layer, "rate")
    ]
    return _Program(
        fns={"step": _trace(step, specs)},
        model=model,
        optimizer=optimizer,
        fresh_weights=fresh,
        fresh_state=fresh_state,
        seeded=seeded,
    )


def _records(outs: list[dict[str, Any]]) -> list[StepRecord]:
    """Per-step records, read back in one transfer per quantity rather than five per step."""
    if not outs:
        return []
    keys = ("loss", "data_loss", "regularization_loss", "gradient_norm", "clipped_gradient_norm")
    columns = {k: tf.stack([o[k] for o in outs]).numpy().tolist() for k in keys}
    return [StepRecord(**{k: float(columns[k][i]) for k in keys}) for i in range(len(outs))]


def _train_step(job: TrainStepJob, limits: Limits) -> TrainStepResult:
    if not 1 <= job.steps <= limits.max_steps:
        raise InvalidRequest(f"steps must be between 1 and {limits.max_steps}", field="steps")
    program, cache = _CACHE.get_or_build(job.signature(), lambda: _compile_step(job, limits))
    _load_weights(program, job.weights, job.dtype)
    kb.assign_optimizer_state(program.optimizer, job.optimizer_state, program.fresh_state)
    dtype = np.dtype(job.dtype)
    n = job.x.shape[0]
    args = [
        np.asarray(job.x, dtype),
        np.zeros([1], dtype) if job.y is None else np.asarray(job.y, dtype),
        np.zeros([n], dtype) if job.actions is None else np.asarray(job.actions, dtype),
        np.zeros([n], dtype) if job.returns is None else np.asarray(job.returns, dtype),
    ]
    iterations = program.optimizer.iterations
    outs: list[dict[str, Any]] = []
    out: dict[str, Any] = {}
    start = time.perf_counter()
    # Converted once, not on every step of a k-step call.
    tensors = [tf.constant(a) for a in args]
    step = program.fns["step"]
    for _ in range(job.steps):
        # Dropout masks depend on (layer seed, iteration) only, so a step is the same however it is batched.
        for generator, seed in program.seeded:
            generator.state.assign(np.asarray([seed, int(iterations.numpy())], generator.state.dtype))
        out = step(*tensors)
        outs.append(out)
    history = _records(outs)
    weights = [np.asarray(w, dtype) for w in program.model.get_weights()]
    state = kb.optimizer_state(program.optimizer, job.dtype)
    gradients = None
    if job.return_gradients:
        arrays = {k: v.numpy() for k, v in out.items() if k.startswith("grad/")}
        gradients = _spread(arrays, "grad", _trainable_mask(program.model), program.fresh_weights)
    return TrainStepResult(
        history=history,
        weights=weights,
        optimizer_state=state,
        gradients=gradients,
        cache=cache,
        compute_ms=(time.perf_counter() - start) * 1000.0,
    )


# --- expression steps


def _compile_expression_step(job: ExpressionStepJob, limits: Limits) -> _Program:
    program = build_program(job.expression, list(job.variables), list(job.constants), job.functions, limits)
    tf_dtype = _TF_DTYPES[job.dtype]
    names = list(job.variables)
    const_names = list(job.constants)
    variables = [
        keras.Variable(np.zeros(job.variables[name].shape), dtype=job.dtype, name=f"v{i}")
        for i, name in enumerate(names)
    ]
    optimizer = kb.make_optimizer(job.optimizer)
    optimizer.build(variables)
    fresh_state = kb.optimizer_state(optimizer, job.dtype)

    def step(*constants: Any) -> dict[str, Any]:
        with tf.GradientTape() as tape:
            env = {name: v.value for name, v in zip(names, variables, strict=True)}
            env |= dict(zip(const_names, constants, strict=True))
            value = Compiler(program, tf_dtype, limits).evaluate(env)
            if value.shape.rank != 0:
                raise ShapeError(
                    f"a step minimizes a scalar; the expression has shape {list(value.shape)} "
                    "(reduce it, e.g. sum(...))",
                    field="expression",
                )
        grads = tape.gradient(value, [v.value for v in variables], unconnected_gradients=_ZERO)
        clipped = kb.apply_clip(grads, job.clip)
        optimizer.apply(clipped, variables)
        zero = tf.zeros([], tf_dtype)
        return {
            "loss": value,
            "data_loss": value,
            "regularization_loss": zero,
            "gradient_norm": tf.linalg.global_norm(grads),
            "clipped_gradient_norm": tf.linalg.global_norm(clipped),
        }

    specs = [tf.TensorSpec(job.constants[name].shape, tf_dtype) for name in const_names]
    return _Program(
        fns={"step": _trace(step, specs)}, optimizer=optimizer, variables=variables, fresh_state=fresh_state
    )


def _expression_step(job: ExpressionStepJob, limits: Limits) -> ExpressionStepResult:
    if not 1 <= job.steps <= limits.max_steps:
        raise InvalidRequest(f"steps must be between 1 and {limits.max_steps}", field="steps")
    program, cache = _CACHE.get_or_build(job.signature(), lambda: _compile_expression_step(job, limits))
    dtype = np.dtype(job.dtype)
    for var, name in zip(program.variables, job.variables, strict=True):
        var.assign(np.asarray(job.variables[name], dtype))
    kb.assign_optimizer_state(program.optimizer, job.optimizer_state, program.fresh_state)
    constants = [tf.constant(np.asarray(job.constants[name], dtype)) for name in job.constants]
    start = time.perf_counter()
    step = program.fns["step"]
    history = _records([step(*constants) for _ in range(job.steps)])
    return ExpressionStepResult(
        history=history,
        variables={
            name: np.asarray(v.numpy(), dtype)
            for name, v in zip(job.variables, program.variables, strict=True)
        },
        optimizer_state=kb.optimizer_state(program.optimizer, job.dtype),
        cache=cache,
        compute_ms=(time.perf_counter() - start) * 1000.0,
    )
