"""Model and step jobs in the worker: model gradients, clipped training steps, expression steps.

Each distinct job signature gets one compiled program (a Keras model or variables, an optimizer
and traced tf.functions) kept in a bounded LRU like the expression programs. Every call loads the
request's weights and optimizer state into the program's variables first, so a program carries no
state from one request to the next: k calls of one step equal one call of k steps.

Loading and reading back happen inside traced graphs, never variable by variable from Python (a
Keras ``assign`` or ``numpy()`` costs ~0.3-0.6 ms each, a dozen of them more than the step itself):
a train step's graph takes the weights and optimizer state as inputs, assigns them, steps and
returns the new ones, so one call of one concrete function is the whole step.

Hyper-parameters are inputs too (service/models/hyperparameters.py): a job's signature holds only
the optimizer's type and options, the clip kind and which regularizers exist, and the numbers
(learning rate, betas, clip threshold, L1/L2 strengths...) come in as one float64 vector per call.
A learning-rate schedule therefore compiles once and runs every later step from the cache.
"""

from __future__ import annotations

import functools
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
from service.models.hyperparameters import clip_kind, regularizer_slots
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
    # Writes every weight (model gradients) or variable and optimizer slot (expression steps) in one call.
    load: Callable[..., Any] | None = None


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


class _FlatCall:
    """A traced concrete function called through its flat entry point.

    ``ConcreteFunction.__call__`` canonicalizes and unpacks its arguments against the structured
    signature, ~0.5 ms a call here: as much as the 32-64-1 training step itself. The input signature
    is fixed when tracing, so a dtype and shape check per argument is all that binding would do;
    ``_call_flat`` is private, but stable across the tensorflow minor version pyproject.toml pins.
    """

    __slots__ = ("_call", "_concrete", "_specs")

    def __init__(self, concrete: Any, specs: list[tf.TensorSpec]) -> None:
        self._concrete = concrete
        self._specs = specs
        self._call = getattr(concrete, "_call_flat", None)

    def __call__(self, *args: Any) -> Any:
        specs = enumerate(zip(args, self._specs, strict=True))
        tensors = [self._tensor(a, spec, i) for i, (a, spec) in specs]
        if self._call is None:
            return self._concrete(*tensors)
        return self._call(tensors, self._concrete.captured_inputs)

    @staticmethod
    def _tensor(arg: Any, spec: tf.TensorSpec, i: int) -> Any:
        tensor = arg if isinstance(arg, tf.Tensor) else tf.constant(arg, spec.dtype)
        if tensor.dtype != spec.dtype or not spec.shape.is_compatible_with(tensor.shape):
            raise ShapeError(
                f"input {i} of the compiled program is {tensor.dtype.name}{tensor.shape.as_list()}; "
                f"it expects {spec.dtype.name}{spec.shape.as_list()}"
            )
        return tensor


def _trace(fn: Callable[..., Any], specs: list[tf.TensorSpec]) -> Callable[..., Any]:
    """A function traced now, so build errors surface as 4xx before any step runs; called flat."""
    traced = tf.function(fn, input_signature=specs, autograph=False)
    try:
        concrete = traced.get_concrete_function()
    except TapeserveError:
        raise
    except LookupError as exc:
        raise NotDifferentiable(f"an operation has no gradient: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise ShapeError(f"the model could not be built for these inputs: {_message(exc)}") from None
    return _FlatCall(concrete, specs)


# Variables travel into and out of a graph packed in ONE flat vector of the computation dtype:
# converting a numpy array to a tensor costs ~50 us, so the 13 tensors of the 32-64-1 MLP with Adam
# cost ~0.6 ms a call (as much as its step); concatenating them costs a few us.


def _packed_spec(variables: list[Any], tf_dtype: Any) -> tf.TensorSpec:
    return tf.TensorSpec([sum(_size(v.shape) for v in variables)], tf_dtype)


def _size(shape: Any) -> int:
    return int(np.prod(tuple(shape), dtype=np.int64))


def _assign_packed(variables: list[Any], packed: Any) -> None:
    """Inside a traced function: write every variable from its slice (the int64 iteration count too)."""
    parts = tf.split(packed, [_size(v.shape) for v in variables]) if variables else []
    for var, part in zip(variables, parts, strict=True):
        var.assign(tf.cast(tf.reshape(part, var.shape), var.dtype))


def _read_packed(variables: list[Any], tf_dtype: Any) -> Any:
    """Inside a traced function: every variable's value, flattened and concatenated."""
    if not variables:
        return tf.zeros([0], tf_dtype)
    return tf.concat([tf.reshape(tf.cast(v.value, tf_dtype), [-1]) for v in variables], 0)


def _pack(arrays: list[np.ndarray], dtype: str) -> np.ndarray:
    if not arrays:
        return np.zeros([0], dtype)
    return np.concatenate([np.ravel(np.asarray(a, dtype)) for a in arrays])


def _unpack(flat: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    """The packed vector as arrays shaped like ``like`` (views of one buffer; no copies)."""
    out: list[np.ndarray] = []
    start = 0
    for ref in like:
        out.append(flat[start : start + ref.size].reshape(ref.shape))
        start += ref.size
    return out


def _assigner(variables: list[Any], tf_dtype: Any) -> Callable[..., Any]:
    """One traced call that writes every variable from a packed vector."""

    def load(packed: Any) -> Any:
        _assign_packed(variables, packed)
        return tf.zeros([])  # an output, so the call waits for the assignments

    return _trace(load, [_packed_spec(variables, tf_dtype)])


def _checked(
    values: list[np.ndarray] | None, fresh: list[np.ndarray], name: str, dtype: str, what: str
) -> list[np.ndarray]:
    """``values`` (or ``fresh``) after the same count and shape checks as the API, in ``dtype``."""
    if values is None:
        return fresh
    if len(values) != len(fresh):
        raise ShapeError(f"{name} has {len(values)} tensors; {what} {len(fresh)}", field=name)
    for i, (value, like) in enumerate(zip(values, fresh, strict=True)):
        if value.shape != like.shape:
            shapes = f"has shape {list(value.shape)}; it must be {list(like.shape)}"
            raise ShapeError(f"{name}[{i}] {shapes}", field=f"{name}[{i}]")
    return [np.asarray(v, dtype) for v in values]


def _checked_state(
    state: list[np.ndarray] | None, program: _Program, dtype: str, optimizer: dict[str, Any]
) -> list[np.ndarray]:
    fresh = kb.fresh_optimizer_state(program.fresh_state, optimizer)  # Adagrad's start is the job's own
    checked = _checked(state, fresh, "optimizer_state", dtype, "this optimizer and model need")
    it = checked[0]
    if not np.isfinite(it) or it < 0 or it != np.round(it):
        raise InvalidRequest(
            "optimizer_state[0] is the iteration count: a non-negative integer", field="optimizer_state[0]"
        )
    return checked


def _spec_of(array: np.ndarray | None, dtype: Any) -> tf.TensorSpec:
    # A free batch axis: one trace serves every batch size.
    shape = [1] if array is None else [None, *array.shape[1:]]
    return tf.TensorSpec(shape, dtype)


def _build_model(spec: dict[str, Any], dtype: str, limits: Limits) -> tuple[Any, list[np.ndarray], list[Any]]:
    """The model, its seeded weights and its regularizers (in the order of the hyper-parameter vector)."""
    model_layout(spec, limits)  # the same checks as the API, in case a job comes from elsewhere
    made: dict[tuple[int, str], Any] = {}
    model = kb.build_model(spec, dtype, made)
    return model, kb.initial_weights(model), [made[slot] for slot in regularizer_slots(spec)]


def _hyperparameters(job: ModelGradientJob | TrainStepJob | ExpressionStepJob) -> np.ndarray:
    """The job's run-time hyper-parameters (a float64 vector), refused unless all finite numbers."""
    try:
        values = job.hyperparameters()
    except (TypeError, ValueError):
        raise InvalidRequest("hyper-parameters (optimizer, clip, regularizers) must be numbers") from None
    if not np.all(np.isfinite(values)):
        raise InvalidRequest("hyper-parameters (optimizer, clip, regularizers) must be finite numbers")
    return values


def _hyper_spec(job: ModelGradientJob | TrainStepJob | ExpressionStepJob) -> tf.TensorSpec:
    return tf.TensorSpec([len(job.hyperparameters())], tf.float64)


def _load_weights(program: _Program, weights: list[np.ndarray] | None, dtype: str) -> None:
    assert program.load is not None
    program.load(_pack(_checked(weights, program.fresh_weights, "weights", dtype, "this model has"), dtype))


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
    hyper = _hyperparameters(job)
    program, cache = _CACHE.get_or_build(job.signature(), lambda: _compile_gradient(job, limits))
    _load_weights(program, job.weights, job.dtype)
    dtype = np.dtype(job.dtype)
    x = np.asarray(job.x, dtype)
    y = np.zeros([1], dtype) if job.y is None else np.asarray(job.y, dtype)
    start = time.perf_counter()
    args: list[Any] = [x, y, hyper]
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
    model, fresh, regularizers = _build_model(job.model, job.dtype, limits)
    tf_dtype = _TF_DTYPES[job.dtype]
    loss_fn = kb.make_loss(job.loss, job.dtype)
    per_example = kb.make_loss(job.loss, job.dtype, reduction=None)
    trainable = list(model.trainable_weights)
    with_inputs = "inputs" in job.wrt or job.saliency
    hvp = job.tangents is not None

    def main(x: Any, y: Any, hyper: Any, *tangents: Any) -> dict[str, Any]:
        with (
            kb.bind_hyperparameters(hyper, job.dtype, regularizers=regularizers),
            tf.GradientTape(persistent=True) as outer,
        ):
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
            products = _dense(
                outer.gradient(grads, trainable, output_gradients=list(tangents), unconnected_gradients=_ZERO)
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
    specs = [x_spec, y_spec, _hyper_spec(job)]
    if hvp:
        specs += [tf.TensorSpec(w.shape, tf_dtype) for w in trainable]
    fns = {"main": _trace(main, specs)}
    if job.adversarial is not None:
        fns["input_grad"] = _trace(input_grad, [x_spec, y_spec])
    return _Program(fns=fns, model=model, fresh_weights=fresh, load=_assigner(list(model.weights), tf_dtype))


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
    model, fresh, regularizers = _build_model(job.model, job.dtype, limits)
    tf_dtype = _TF_DTYPES[job.dtype]
    trainable = list(model.trainable_weights)
    optimizer = kb.make_optimizer(job.optimizer)
    optimizer.build(trainable)
    fresh_state = kb.optimizer_state(optimizer, job.dtype)
    objective = _objective_loss(job, model, kb.make_loss(job.loss, job.dtype), tf_dtype)
    # get_weights() order, then the documented optimizer state order: the request's and response's lists.
    carried = list(model.weights) + kb.optimizer_state_variables(optimizer)
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
        _assign_packed(carried, packed)
        # Dropout masks depend on (layer seed, iteration) only, so a step is the same however it is batched.
        for state, seed in seeded:
            state.assign(tf.stack([tf.constant(seed, state.dtype), tf.cast(iterations, state.dtype)]))
        with kb.bind_hyperparameters(hyper, job.dtype, optimizer, kind, clip, regularizers) as threshold:
            with tf.GradientTape() as tape:
                data, reg = objective(x, y, actions, returns)
                total = data + reg
            grads = _dense(tape.gradient(total, trainable, unconnected_gradients=_ZERO))
            clipped = kb.apply_clip(grads, clip, threshold)
            optimizer.apply(clipped, trainable)
        norms = [tf.linalg.global_norm(grads), tf.linalg.global_norm(clipped)]
        record = tf.stack([tf.cast(q, tf_dtype) for q in [total, data, reg, *norms]])  # _RECORD order
        return record, grads, _read_packed(carried, tf_dtype)

    # Actions and returns (reinforce only; empty otherwise) take any length: one trace serves every batch.
    vector = tf.TensorSpec([None], tf_dtype)
    specs = [_spec_of(job.x, tf_dtype), _spec_of(job.y, tf_dtype), vector, vector]
    specs += [_packed_spec(carried, tf_dtype), _hyper_spec(job)]
    return _Program(
        fns={"step": _trace(step, specs)},
        model=model,
        optimizer=optimizer,
        fresh_weights=fresh,
        fresh_state=fresh_state,
    )


# The fields of a StepRecord, in the order a step graph stacks them.
_RECORD = ("loss", "data_loss", "regularization_loss", "gradient_norm", "clipped_gradient_norm")


def _records(records: list[Any]) -> list[StepRecord]:
    """Per-step records from the steps' stacked record tensors, read back in one transfer."""
    if not records:
        return []
    rows = (records[0].numpy()[None] if len(records) == 1 else tf.stack(records).numpy()).tolist()
    return [StepRecord(**dict(zip(_RECORD, row, strict=True))) for row in rows]


@functools.cache
def _empty(dtype: str, shape: tuple[int, ...]) -> Any:
    """The zeros passed for an input the objective does not use (made once: a conversion costs ~50 us)."""
    return tf.zeros(shape, _TF_DTYPES[dtype])


def _train_step(job: TrainStepJob, limits: Limits) -> TrainStepResult:
    if not 1 <= job.steps <= limits.max_steps:
        raise InvalidRequest(f"steps must be between 1 and {limits.max_steps}", field="steps")
    hyper = _hyperparameters(job)
    program, cache = _CACHE.get_or_build(job.signature(), lambda: _compile_step(job, limits))
    dtype = np.dtype(job.dtype)
    weights = _checked(job.weights, program.fresh_weights, "weights", job.dtype, "this model has")
    state = _checked_state(job.optimizer_state, program, job.dtype, job.optimizer)
    start = time.perf_counter()
    # Converted once, not on every step of a k-step call.
    tensors = [
        tf.constant(np.asarray(job.x, dtype)),
        _empty(job.dtype, (1,)) if job.y is None else tf.constant(np.asarray(job.y, dtype)),
        _empty(job.dtype, (0,)) if job.actions is None else tf.constant(np.asarray(job.actions, dtype)),
        _empty(job.dtype, (0,)) if job.returns is None else tf.constant(np.asarray(job.returns, dtype)),
    ]
    packed: Any = _pack([*weights, *state], job.dtype)
    hyper_tensor = tf.constant(hyper)
    step = program.fns["step"]
    records: list[Any] = []
    grads: list[Any] = []
    for _ in range(job.steps):
        # Each step's packed output feeds the next as a tensor; only the last becomes a numpy array.
        record, grads, packed = step(*tensors, packed, hyper_tensor)
        records.append(record)
    history = _records(records)
    arrays = _unpack(packed.numpy(), [*program.fresh_weights, *program.fresh_state])
    count = len(program.fresh_weights)
    gradients = None
    if job.return_gradients:
        out = {f"grad/{i}": g.numpy() for i, g in enumerate(grads)}
        gradients = _spread(out, "grad", _trainable_mask(program.model), program.fresh_weights)
    return TrainStepResult(
        history=history,
        weights=arrays[:count],
        optimizer_state=arrays[count:],
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

    carried = [*variables, *kb.optimizer_state_variables(optimizer)]
    clip = clip_kind(job.clip)
    kind = job.optimizer["type"]

    def step(*inputs: Any) -> tuple[Any, Any]:
        *constants, packed, hyper = inputs
        _assign_packed(carried, packed)  # then the step, then the reads (automatic control dependencies)
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
        grads = _dense(tape.gradient(value, [v.value for v in variables], unconnected_gradients=_ZERO))
        with kb.bind_hyperparameters(hyper, job.dtype, optimizer, kind, clip) as threshold:
            clipped = kb.apply_clip(grads, clip, threshold)
            optimizer.apply(clipped, variables)
        norms = [tf.linalg.global_norm(grads), tf.linalg.global_norm(clipped)]
        record = tf.stack([tf.cast(q, tf_dtype) for q in [value, value, tf.zeros([], tf_dtype), *norms]])
        return record, _read_packed(carried, tf_dtype)

    specs = [tf.TensorSpec(job.constants[name].shape, tf_dtype) for name in const_names]
    specs += [_packed_spec(carried, tf_dtype), _hyper_spec(job)]
    return _Program(
        fns={"step": _trace(step, specs)}, optimizer=optimizer, variables=variables, fresh_state=fresh_state
    )


def _expression_step(job: ExpressionStepJob, limits: Limits) -> ExpressionStepResult:
    if not 1 <= job.steps <= limits.max_steps:
        raise InvalidRequest(f"steps must be between 1 and {limits.max_steps}", field="steps")
    hyper = _hyperparameters(job)
    program, cache = _CACHE.get_or_build(job.signature(), lambda: _compile_expression_step(job, limits))
    dtype = np.dtype(job.dtype)
    state = _checked_state(job.optimizer_state, program, job.dtype, job.optimizer)
    constants = [tf.constant(np.asarray(job.constants[name], dtype)) for name in job.constants]
    variables = [np.asarray(job.variables[name], dtype) for name in job.variables]
    packed: Any = _pack([*variables, *state], job.dtype)
    hyper_tensor = tf.constant(hyper)
    start = time.perf_counter()
    step = program.fns["step"]
    records: list[Any] = []
    for _ in range(job.steps):
        record, packed = step(*constants, packed, hyper_tensor)
        records.append(record)
    history = _records(records)
    arrays = _unpack(packed.numpy(), [*variables, *state])
    count = len(variables)
    return ExpressionStepResult(
        history=history,
        variables=dict(zip(job.variables, arrays[:count], strict=True)),
        optimizer_state=arrays[count:],
        cache=cache,
        compute_ms=(time.perf_counter() - start) * 1000.0,
    )
