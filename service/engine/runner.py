"""Tape programs: one traced tf.function per distinct job signature, cached, fed only values.

A program computes the value and every requested derivative from one forward pass under nested
persistent GradientTapes (plus a ForwardAccumulator for jvp), as in the GradientTape guide.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from service.engine.plan import Plan, build_plan
from service.engine.programs import ProgramCache, dense, error_message, without_grappler
from service.errors import (
    EvaluationError,
    InvalidRequest,
    LimitExceeded,
    NotDifferentiable,
    ShapeError,
    TapeserveError,
)
from service.expr.compiler import Compiler
from service.expr.program import Program, build_program
from service.jobs import GradientJob, GradientResult, StackedGradientJob, check_gradient_job, loop_counts
from service.limits import Limits

__all__ = ["TapeProgram", "after_reply", "cache_info", "run"]

_ZERO = tf.UnconnectedGradients.ZERO
# The most requests one stacked call may carry (the API's batcher sends at most this many); it
# scales the element limit checks, which see one request's shapes while tracing.
_MAX_STACK = 1024
_DTYPES = {"float32": tf.float32, "float64": tf.float64}
# Tape programs are pure: no variables, no stateful or side-effecting ops, every op feeds an output.
# Automatic control dependencies (which order stateful ops) then have nothing to do, yet walking the
# graph for them costs ~15% of a cold trace; tf.function's documented attribute turns them off.
_ATTRIBUTES = {"_disable_acd": True}
# Forms that trace graph loops: numpy plans cannot run them, so their programs keep Grappler.
_LOOPS = frozenset({"scan", "fori"})
# Numpy plans (service/engine/plan.py) for small programs called more than once; TAPESERVE_NUMPY_PLANS=0
# keeps every call on TensorFlow's runtime. Above this many input elements TF's own call overhead
# no longer matters, and its kernels are the ones to trust for speed.
PLANS_ENABLED = os.environ.get("TAPESERVE_NUMPY_PLANS", "1") != "0"
PLAN_MAX_ELEMENTS = 65_536
_PLAN_UNTRIED, _PLAN_ON, _PLAN_OFF = 0, 1, 2
_PLAN_TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}
# Plans waiting to be built: (program, inputs, TF's outputs) from a program's second call. Building
# takes 5-20 ms, so a worker does it after sending that call's reply (after_reply); in-process
# callers get it at the start of their next run.
_PENDING: list[tuple[TapeProgram, list[np.ndarray], list[np.ndarray]]] = []
# Stacked forms being traced in a background thread (key -> its future): tracing one takes 0.2-0.5 s,
# a stall for every queued request if done in line, so meanwhile the requests of a stacked job run
# one by one on their warm plain program, and the stacked form is used once it is ready.
_STACKING: dict[str, Future[TapeProgram]] = {}
_TRACER: ThreadPoolExecutor | None = None
# While it traces, the interpreter switches threads this often (seconds), so jobs on the main thread
# wait at most about this long for it (Python's default, 5 ms, would be each request's wait).
_TRACING_SWITCH_INTERVAL_S = 0.0005


@dataclass(slots=True)
class TapeProgram:
    """A traced program: call it with input arrays in ``inputs`` order, get named output tensors."""

    call: Callable[..., Sequence[Any]]  # flat tensors in, flat tensors out (in ``outputs`` order)
    inputs: tuple[tuple[str, str], ...]  # (group, name): group in variables/constants/tangents/cotangent
    outputs: tuple[str, ...]
    compile_ms: float
    stacked: bool = False  # every input has a leading axis of independent requests
    graph: Any = None  # the traced FuncGraph a numpy plan is read from; None: no plan possible
    plan: Plan | None = None
    plan_state: int = _PLAN_UNTRIED
    seen: bool = False  # called once already: the second call asks for a plan


# 256 programs: each holds a few graphs of a few hundred KB; bounded well under a worker's memory.
_CACHE: ProgramCache[TapeProgram] = ProgramCache(int(os.environ.get("TAPESERVE_CACHE_SIZE", "256")))


def cache_info() -> dict[str, int]:
    return _CACHE.info()


def run(job: GradientJob | StackedGradientJob, limits: Limits | None = None) -> Any:
    """Compute a job's value and derivatives, compiling (and caching) its program on first sight.

    A StackedGradientJob (dynamic batching: several requests of one signature) gives one
    GradientResult per request, from one vectorized call.
    """
    limits = limits or Limits()
    after_reply()
    if isinstance(job, StackedGradientJob):
        return _run_stacked(job, limits)
    if not isinstance(job, GradientJob):
        raise InvalidRequest(f"unknown job type {type(job).__name__}")
    program, cache = _program(job, limits, stacked=False)
    start = time.perf_counter()
    arrays, executor = _call(program, job, [job])
    compute_ms = (time.perf_counter() - start) * 1000.0
    return _result(job, arrays, cache, compute_ms, executor)


def _program(job: GradientJob, limits: Limits, stacked: bool) -> tuple[TapeProgram, str]:
    key = ("stacked|" if stacked else "") + job.signature()
    return _CACHE.get_or_build(key, lambda: _compile(job, limits, stacked=stacked))


def _call(
    program: TapeProgram, first: GradientJob, jobs: list[GradientJob]
) -> tuple[dict[str, np.ndarray], str]:
    """Feed the jobs' arrays (stacked along a new axis when there are several) to a program.

    Returns the named outputs and which executor computed them: "numpy" (the program's plan) or
    "tensorflow".
    """
    dtype = np.float32 if first.dtype == "float32" else np.float64
    inputs = []
    for group, name in program.inputs:
        arrays = [
            np.asarray(j.cotangent if group == "cotangent" else getattr(j, group)[name], dtype) for j in jobs
        ]
        inputs.append(np.stack(arrays) if program.stacked else arrays[0])
    if program.plan is not None:
        planned = _run_plan(program.plan, inputs)
        if planned is not None:
            return dict(zip(program.outputs, planned, strict=True)), "numpy"
    try:
        outputs = [v.numpy() for v in program.call(*[tf.constant(a) for a in inputs])]
    except tf.errors.InvalidArgumentError as exc:
        message = error_message(exc.message or str(exc), "invalid values")
        raise EvaluationError(f"the computation failed for these values: {message}") from None
    if program.plan_state == _PLAN_UNTRIED and program.graph is not None and PLANS_ENABLED:
        if program.seen:
            _PENDING.append((program, inputs, outputs))
        program.seen = True  # most programs used once never pay for a plan
    return dict(zip(program.outputs, outputs, strict=True)), "tensorflow"


def after_reply() -> None:
    """Build the plans the last calls asked for (the worker calls it once a reply is sent)."""
    while True:
        try:
            pending = _PENDING.pop()  # atomic: in-process callers may run jobs in several threads
        except IndexError:
            return
        _adopt_plan(*pending)


def _run_plan(plan: Plan, inputs: list[np.ndarray]) -> list[np.ndarray] | None:
    """The plan's outputs, or None when TF should answer: the plan failed, or something is not finite."""
    try:
        outputs = plan(inputs)
    except Exception:  # e.g. an index out of range: TF's own error message is the one to give
        return None
    if all(np.isfinite(o).all() for o in outputs):
        return outputs
    return None


def _adopt_plan(program: TapeProgram, inputs: list[np.ndarray], expected: list[np.ndarray]) -> None:
    """Build a program's numpy plan and keep it if it reproduces TF's outputs for the same inputs.

    A comparison needs finite reference outputs; with others the decision waits for another call.
    """
    if program.plan_state != _PLAN_UNTRIED:
        return
    if not all(np.isfinite(e).all() for e in expected):
        return
    graph = program.graph
    try:
        plan = build_plan(graph, graph.inputs, graph.outputs)
        got = plan(inputs)
    except Exception:  # UnsupportedGraph, or a kernel disagreeing with the graph's shapes
        program.plan_state = _PLAN_OFF
        return
    program.plan_state = _PLAN_OFF
    for a, e in zip(got, expected, strict=True):
        if a.shape != e.shape or a.dtype != e.dtype:
            return
        tolerance = _PLAN_TOLERANCE.get(e.dtype, 0.0)
        scale = max(1.0, float(np.max(np.abs(e)))) if e.size else 1.0
        if not np.allclose(a, e, rtol=tolerance, atol=tolerance * scale):
            return
    program.plan = plan
    program.plan_state = _PLAN_ON


def _result(
    job: GradientJob, arrays: dict[str, np.ndarray], cache: str, compute_ms: float, executor: str
) -> GradientResult:
    wrt = list(job.wrt) if job.wrt else list(job.variables)
    result = _unflatten(arrays, wrt[0] if wrt else None)
    result.cache = cache
    result.compute_ms = compute_ms
    result.executor = executor
    return result


def _run_stacked(stacked: StackedGradientJob, limits: Limits) -> list[GradientResult]:
    if not 1 <= len(stacked.jobs) <= _MAX_STACK:
        raise InvalidRequest(f"a stacked job carries 1 to {_MAX_STACK} jobs, not {len(stacked.jobs)}")
    first = stacked.jobs[0]
    key = first.signature()
    if any(j.signature() != key for j in stacked.jobs[1:]):
        raise InvalidRequest("a stacked job mixes programs of different signatures")
    ready = _stacked_program(first, key, limits)
    if ready is None:  # its stacked form is being traced: each request on the warm plain program
        return [run(job, limits) for job in stacked.jobs]
    program, cache = ready
    start = time.perf_counter()
    arrays, executor = _call(program, first, stacked.jobs)
    compute_ms = (time.perf_counter() - start) * 1000.0 / len(stacked.jobs)
    return [
        _result(job, {k: v[i] for k, v in arrays.items()}, cache, compute_ms, executor)
        for i, job in enumerate(stacked.jobs)
    ]


def _stacked_program(first: GradientJob, signature: str, limits: Limits) -> tuple[TapeProgram, str] | None:
    """The stacked program for ``first`` (whose plain program is ``signature``), or None while it is
    traced in the background.

    Only a program whose plain form is cached (warm) gets its stacked form traced in the background;
    otherwise, or when that tracing failed, it is traced here, so its error is this call's.
    """
    key = "stacked|" + signature
    program = _CACHE.get(key)
    if program is not None:
        return program, "hit"
    tracing = _STACKING.get(key)
    if tracing is None and signature in _CACHE.entries:
        _STACKING[key] = _tracer().submit(_trace_stacked, first, limits)
        return None
    if tracing is not None:
        if not tracing.done():
            return None
        del _STACKING[key]
        if tracing.exception() is None:
            _CACHE.put(key, tracing.result())
            return tracing.result(), "miss"
    return _program(first, limits, stacked=True)


def _tracer() -> ThreadPoolExecutor:
    global _TRACER
    if _TRACER is None:
        _TRACER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stacked-trace")
    return _TRACER


def _trace_stacked(first: GradientJob, limits: Limits) -> TapeProgram:
    """Trace and instantiate a stacked program, off the thread that answers jobs.

    It is instantiated (TensorFlow's graph optimizer runs on the first call) on an empty stack of
    requests: nothing computes on anyone's values here, so a failure in this thread can never be
    charged to the job the main thread happens to be running.
    """
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, _TRACING_SWITCH_INTERVAL_S))
    try:
        program = _compile(first, limits, stacked=True)
        dtype = np.float32 if first.dtype == "float32" else np.float64
        arrays = [
            np.asarray(first.cotangent if g == "cotangent" else getattr(first, g)[n])
            for g, n in program.inputs
        ]
        empty = [np.zeros((0, *a.shape), dtype) for a in arrays]
        with contextlib.suppress(Exception):  # only the instantiation matters
            program.call(*[tf.constant(a) for a in empty])
        return program
    finally:
        sys.setswitchinterval(interval)


def _unflatten(arrays: dict[str, np.ndarray], variable: str | None) -> GradientResult:
    result = GradientResult(value=arrays["value"])
    higher: list[tuple[int, np.ndarray]] = []
    for key, array in arrays.items():
        kind, _, rest = key.partition("/")
        if kind in ("gradient", "jacobian", "hvp", "vjp"):
            target = getattr(result, kind)
            if target is None:
                target = {}
                setattr(result, kind, target)
            target[rest] = array
        elif kind == "hessian":
            a, b = rest.split("/")
            if result.hessian is None:
                result.hessian = {}
            result.hessian.setdefault(a, {})[b] = array
        elif kind == "jvp":
            result.jvp = array
        elif kind == "higher":
            higher.append((int(rest), array))
    if higher:
        result.higher = {
            "variable": variable or "",
            "order": len(higher),
            "derivatives": [a for _, a in sorted(higher, key=lambda p: p[0])],
        }
    return result


def _compile(job: GradientJob, limits: Limits, stacked: bool = False) -> TapeProgram:
    wrt = list(check_gradient_job(job, limits))  # the API's checks again: a job may come from elsewhere
    derivatives = set(job.derivatives)
    program = build_program(job.expression, list(job.variables), list(job.constants), job.functions, limits)
    _check_order(program, job, derivatives, limits)
    dtype = _DTYPES[job.dtype]
    var_names = list(job.variables)
    const_names = list(job.constants)
    tangent_names = wrt if derivatives & {"hvp", "jvp"} else []
    use_cot = "vjp" in derivatives
    batch = next(iter(job.variables.values())).shape[0] if job.batch else 1

    inputs: list[tuple[str, str]] = [("variables", k) for k in var_names]
    inputs += [("constants", k) for k in const_names]
    inputs += [("tangents", k) for k in tangent_names]
    if use_cot:
        inputs.append(("cotangent", ""))
    specs = []
    for group, name in inputs:
        array = job.cotangent if group == "cotangent" else getattr(job, group)[name]
        assert array is not None
        # Stacked programs take any number of requests along a new leading axis: traced once.
        shape = [None, *array.shape] if stacked else list(array.shape)
        specs.append(tf.TensorSpec(shape, dtype, name=f"{group}_{name}"[:60]))

    nv, nc, nt = len(var_names), len(const_names), len(tangent_names)

    def body(*tensors: Any) -> dict[str, Any]:
        variables = list(tensors[:nv])
        constants = list(tensors[nv : nv + nc])
        tangents = list(tensors[nv + nc : nv + nc + nt])
        cotangent = tensors[-1] if use_cot else None
        if stacked:

            def request(elems: tuple[list[Any], list[Any], list[Any], Any]) -> dict[str, Any]:
                rv, rc, rt, rcot = elems
                return _tape_program(
                    program, job, limits, wrt, derivatives, dtype,
                    rv, rc, rt, rcot, var_names, const_names, _MAX_STACK,
                )  # fmt: skip

            cot = cotangent if cotangent is not None else tf.zeros(tf.shape(tensors[0])[:1], dtype)
            return _map_points(request, (variables, constants, tangents, cot))  # type: ignore[no-any-return]
        if not job.batch:
            return _tape_program(
                program,
                job,
                limits,
                wrt,
                derivatives,
                dtype,
                variables,
                constants,
                tangents,
                cotangent,
                var_names,
                const_names,
                batch,
            )

        def point(elems: tuple[list[Any], list[Any], Any]) -> dict[str, Any]:
            pv, pt, pc = elems
            return _tape_program(
                program,
                job,
                limits,
                wrt,
                derivatives,
                dtype,
                pv,
                constants,
                pt,
                pc,
                var_names,
                const_names,
                batch,
            )

        cot_elems = cotangent if cotangent is not None else tf.zeros([batch], dtype)
        return _map_points(point, (variables, tangents, cot_elems))  # type: ignore[no-any-return]

    start = time.perf_counter()
    fn = tf.function(body, input_signature=specs, autograph=False, experimental_attributes=_ATTRIBUTES)
    try:
        concrete = fn.get_concrete_function()
    except TapeserveError:
        raise
    except LookupError as exc:
        raise NotDifferentiable(f"an operation in the expression has no gradient: {exc}") from None
    except (ValueError, TypeError) as exc:
        message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ShapeError(f"the program could not be built: {message}") from None
    compile_ms = (time.perf_counter() - start) * 1000.0
    # Outputs flatten in sorted-key order (tf.nest's rule for dicts).
    outputs = tuple(sorted(concrete.structured_outputs))
    call = _flat_caller(concrete)
    atomic = getattr(call, "__self__", None)  # the atomic function, when the flat call is its own
    small = not stacked and sum(_numel(spec.shape) for spec in specs) <= PLAN_MAX_ELEMENTS
    graph = atomic.graph if atomic is not None and small else None
    if graph is not None and not program.forms & _LOOPS:
        # Small straight-line programs: their later calls run as numpy plans, so what Grappler
        # would save them is not worth its share of the first call (service/engine/programs.py).
        call = without_grappler(call)
    return TapeProgram(call, tuple(inputs), outputs, compile_ms, stacked, graph)


def _check_order(program: Program, job: GradientJob, derivatives: set[str], limits: Limits) -> None:
    """The request's derivatives nest on the program's own (grad, hvp): together at most max_order."""
    if not program.derivative_order:
        return
    asked = max(
        job.order or 0,
        2 if derivatives & {"hessian", "hvp"} else 0,
        1 if derivatives & {"gradient", "jacobian", "vjp", "jvp"} else 0,
    )
    if program.derivative_order + asked > limits.max_order:
        raise LimitExceeded(
            f"the expression takes derivatives to order {program.derivative_order} inside (grad 1, "
            f"hvp 2) and the request asks for order {asked} of it: {program.derivative_order + asked} "
            f"in all; at most {limits.max_order} are allowed",
            limit="max_order",
            allowed=limits.max_order,
            field="derivatives" if not job.order else "order",
        )


def _flat_caller(concrete: Any) -> Callable[..., Sequence[Any]]:
    """The cheapest way to run a traced program: its atomic function on flat tensors.

    ConcreteFunction.__call__ re-checks the input structure and records on tapes on every call
    (~0.2 ms for a small program); the atomic function skips both. If a TF release moves that
    private attribute, fall back to the public call.
    """
    atomic = getattr(concrete, "_inference_function", None)
    if atomic is not None and hasattr(atomic, "call_flat") and not concrete.captured_inputs:
        call: Callable[..., Sequence[Any]] = atomic.call_flat
        return call

    def public(*args: Any) -> Sequence[Any]:
        structured = concrete(*args)
        return [structured[k] for k in sorted(structured)]

    return public


def _jacobian(tape: tf.GradientTape, target: Any, source: Any, vectorize: bool = True) -> Any:
    """d target / d source, shaped target.shape + source.shape: one vjp per row, vectorized.

    The rows are the vjps with the identity's rows as cotangents, under tf.vectorized_map. It is
    the same pfor machinery as GradientTape.jacobian, minus the gather of each target element
    (whose gradient, a segment sum, pfor then has to convert too): about a quarter less tracing
    for a cold Hessian, the same speed warm.
    """
    if not target.shape.is_fully_defined():
        return tape.jacobian(target, source, unconnected_gradients=_ZERO)
    rows = _numel(target.shape)
    eye = tf.reshape(tf.eye(rows, dtype=target.dtype), [rows, *target.shape])

    def row(cotangent: Any) -> Any:
        grad = tape.gradient(target, source, output_gradients=cotangent, unconnected_gradients=_ZERO)
        return tf.convert_to_tensor(grad)

    return tf.reshape(_map_points(row, eye, vectorize), [*target.shape, *source.shape])


def _map_points(fn: Callable[[Any], Any], elems: Any, vectorize: bool = True) -> Any:
    """``fn`` over the leading axis of ``elems``: vectorized, or one point at a time in a graph loop.

    pfor converts most programs, op by op (and loops ops it has no rule for). A few it cannot convert
    at all, e.g. the second derivative of a scan or fori (its gradient's TensorList accumulators
    lose their element shapes); those run as a tf.map_fn loop: the same values, traced once, one row
    after another. The loop needs the output structure first: fn traced once more on a zero point
    (ops nothing uses, which never run). ``vectorize=False`` goes straight there, for programs pfor
    is known to refuse: a failed conversion costs seconds of tracing before it fails.
    """
    vectorized = _vectorized_or_none(fn, elems) if vectorize else None
    return _loop_points(fn, elems) if vectorized is None else vectorized


def _vectorized_or_none(fn: Callable[[Any], Any], elems: Any) -> Any:
    """tf.vectorized_map, or None where pfor cannot convert the program."""
    tf_logger = tf.get_logger()
    level = tf_logger.level
    # pfor logs each op it fails to convert with the whole graph around it; the fallback says enough.
    tf_logger.setLevel("CRITICAL")
    try:
        return tf.vectorized_map(fn, elems, fallback_to_while_loop=True)
    except TapeserveError:
        raise
    except (ValueError, TypeError, NotImplementedError):
        pass
    finally:
        tf_logger.setLevel(level)
    return None


def _loop_points(fn: Callable[[Any], Any], elems: Any) -> Any:
    probe = fn(tf.nest.map_structure(lambda t: tf.zeros(t.shape[1:], t.dtype), elems))
    signature = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), probe)
    return tf.map_fn(fn, elems, fn_output_signature=signature)


def _reverse_jvp(tape: tf.GradientTape, f: Any, xs: list[Any], tangents: list[Any]) -> Any:
    """J t as the derivative in u of <vjp(u), t>: linear in u, so taken at u = 0."""
    u = tf.zeros_like(f)
    with tf.GradientTape() as in_u:
        in_u.watch(u)
        vjp = dense(tape.gradient(f, xs, output_gradients=u, unconnected_gradients=_ZERO))
        pairing = tf.add_n([tf.reduce_sum(v * t) for v, t in zip(vjp, tangents, strict=True)])
    return tf.convert_to_tensor(in_u.gradient(pairing, u, unconnected_gradients=_ZERO))


def _check_size(count: int, batch: int, limits: Limits, what: str) -> None:
    # An empty batch counts as one point: a zero-length axis never cancels another in a size check.
    total = count * max(batch, 1)
    if total > limits.max_tensor_elements:
        raise LimitExceeded(
            f"the {what} would have {total} elements; at most {limits.max_tensor_elements} are allowed",
            limit="max_tensor_elements",
            allowed=limits.max_tensor_elements,
            derivative=what,
            estimate=total if total < 2**53 else float(total),  # JSON numbers stay exact or float
        )


def _check_rows(rows: int, largest: int, batch: int, limits: Limits, what: str) -> int:
    """Bound a vectorized Jacobian before it is traced; returns its largest tensor (per point).

    ``_jacobian`` runs one vector-Jacobian product per row under ``tf.vectorized_map``, which gives
    every tensor of the differentiated program a leading axis of ``rows``: its peak is about ``rows``
    times the program's largest tensor (``largest``), and its identity seed is ``rows**2``.
    """
    _check_size(rows * rows, batch, limits, f"{what} (its identity seed, {rows} x {rows})")
    _check_size(rows * largest, batch, limits, f"{what} (its {rows} vectorized rows of {largest} elements)")
    return rows * largest


def _numel(shape: Any) -> int:
    return int(np.prod([int(d) for d in shape], dtype=np.int64)) if len(shape) else 1


def _bound(shape: Any) -> int:
    """Elements of ``shape`` for a size check: exact Python ints, and a zero-length axis counts as
    one, so it never hides the size of the others (pfor and identities still build them)."""
    return math.prod(max(int(d), 1) for d in shape)


def _tape_program(
    program: Program,
    job: GradientJob,
    limits: Limits,
    wrt: list[str],
    derivatives: set[str],
    dtype: Any,
    variables: list[Any],
    constants: list[Any],
    tangents: list[Any],
    cotangent: Any,
    var_names: list[str],
    const_names: list[str],
    batch: int,
) -> dict[str, Any]:
    """Trace value and derivatives for one point (or the whole input when not batched)."""
    compiler = Compiler(
        program, dtype, limits, batch_size=batch, counts=loop_counts(job.constants, job.counts)
    )
    env = dict(zip(var_names, variables, strict=True)) | dict(zip(const_names, constants, strict=True))
    xs = [env[name] for name in wrt]
    order = job.order or 0
    second = bool(derivatives & {"hessian", "hvp"})
    # Forward mode cannot pass a loop that keeps TensorLists (scan's stacked outputs, and any loop's
    # gradient accumulators once a tape records it): the ForwardAccumulator has no tangent for them.
    # There the jvp is the derivative of a vjp in its cotangent.
    loops = bool(program.forms & {"scan", "fori"})
    reverse_jvp = "jvp" in derivatives and loops
    first = second or bool(derivatives & {"gradient", "jacobian", "vjp"}) or order > 0 or reverse_jvp
    depth = max(order, 2 if second else (1 if first else 0))

    out: dict[str, Any] = {}
    tapes: list[tf.GradientTape] = []
    open_tapes = 0
    try:
        for _ in range(depth):
            tape = tf.GradientTape(persistent=True)
            tape.__enter__()
            open_tapes += 1
            tape.watch(xs)
            tapes.append(tape)
        if "jvp" in derivatives and not reverse_jvp:
            with tf.autodiff.ForwardAccumulator(xs, tangents) as acc:
                f = compiler.evaluate(env)
                out["jvp"] = acc.jvp(f, unconnected_gradients=_ZERO)
        else:
            f = compiler.evaluate(env)
        out["value"] = f
        per_point = " per point" if job.batch else ""
        if ("hessian" in derivatives or order) and f.shape.rank != 0:
            what = "hessian" if "hessian" in derivatives else "order"
            raise ShapeError(
                f"{what} needs a scalar expression, this one has shape {list(f.shape)}{per_point}; "
                "reduce it (e.g. sum(...)) or ask for the jacobian",
                field="derivatives" if what == "hessian" else "order",
            )
        if order:
            _check_size(_bound(xs[0].shape) ** order, batch, limits, f"order-{order} derivative")
        largest = max(compiler.largest, *(_bound(x.shape) for x in xs), _bound(f.shape))
        grads: list[Any] = []
        chain: list[Any] = []
        # Close the tapes innermost first; each derivative is taken while the outer tapes still
        # record it, so they can differentiate it once more.
        for level in range(depth - 1, -1, -1):
            tapes[level].__exit__(None, None, None)
            open_tapes -= 1
            if level == depth - 1:
                grads = dense(tapes[level].gradient(f, xs, unconnected_gradients=_ZERO))
                chain = [grads[0]] if order else []
            elif len(chain) < order:
                # Each level vectorizes the program of the level before, rows and all.
                what = f"order-{len(chain) + 1} derivative"
                largest = _check_rows(_bound(chain[-1].shape), largest, batch, limits, what)
                chain.append(_jacobian(tapes[level], chain[-1], xs[0], not loops))
        for i, d in enumerate(chain):
            out[f"higher/{i + 1}"] = d
        if reverse_jvp:
            out["jvp"] = _reverse_jvp(tapes[-1], f, xs, tangents)
        if "gradient" in derivatives:
            for name, g in zip(wrt, grads, strict=True):
                out[f"gradient/{name}"] = g
        if "jacobian" in derivatives:
            for name, x in zip(wrt, xs, strict=True):
                _check_size(_bound(f.shape) * _bound(x.shape), batch, limits, f"jacobian for {name!r}")
                _check_rows(_bound(f.shape), largest, batch, limits, f"jacobian for {name!r}")
                out[f"jacobian/{name}"] = _jacobian(tapes[-1], f, x)
        if "vjp" in derivatives:
            if cotangent.shape != f.shape:
                raise ShapeError(
                    f"cotangent has shape {list(cotangent.shape)}{per_point}, the expression's value has "
                    f"shape {list(f.shape)}{per_point}",
                    field="cotangent",
                )
            vjp = dense(tapes[-1].gradient(f, xs, output_gradients=cotangent, unconnected_gradients=_ZERO))
            for name, v in zip(wrt, vjp, strict=True):
                out[f"vjp/{name}"] = v
        if "hessian" in derivatives:
            for a, ga in zip(wrt, grads, strict=True):
                for b, xb in zip(wrt, xs, strict=True):
                    block = f"hessian block {a}, {b}"
                    _check_size(_bound(ga.shape) * _bound(xb.shape), batch, limits, block)
                    _check_rows(_bound(ga.shape), largest, batch, limits, block)
                    out[f"hessian/{a}/{b}"] = _jacobian(tapes[-2], ga, xb, not loops)
        if "hvp" in derivatives:
            hvp = dense(tapes[-2].gradient(grads, xs, output_gradients=tangents, unconnected_gradients=_ZERO))
            for name, h in zip(wrt, hvp, strict=True):
                out[f"hvp/{name}"] = h
        return out
    except LookupError as exc:
        raise NotDifferentiable(f"an operation in the expression has no gradient: {exc}") from None
    finally:
        while open_tapes:
            open_tapes -= 1
            tapes[open_tapes].__exit__(None, None, None)
