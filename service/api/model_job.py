"""Between wire and engine for models and steps: requests become jobs, results become response bodies.

Everything knowable without TensorFlow is checked here, before a worker is involved: the spec's
layout and parameter count (``service.models.layout``), the expression program, and the job's own
check from ``service.jobs`` (shapes of x, y, weights, tangents and optimizer state, label ranges,
reinforce actions and returns, steps), which the engine runs again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from service.api import wire
from service.api.model_schemas import (
    DescribeRequest,
    DescribeResponse,
    ExpressionStepRequest,
    ModelGradientRequest,
    Reinforce,
    TrainStepRequest,
    WeightDescription,
)
from service.api.offload import RequestWork, claimed_elements
from service.api.problems import as_tapeserve_error
from service.errors import TapeserveError
from service.expr.program import check_program, unchecked_chars
from service.jobs import (
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
    check_steps,
    check_train_step_job,
    job_functions,
)
from service.limits import Limits
from service.models.layout import ModelLayout, model_layout, optimizer_state_layout, variables_layout
from service.tensorcodec import Encoding, decode_tensor, encode_tensor

__all__ = [
    "NDJSON_MEDIA_TYPE",
    "StepJob",
    "StepResult",
    "chunk_sizes",
    "build_expression_step_job",
    "build_model_gradient_job",
    "build_train_step_job",
    "describe_model",
    "render_expression_step",
    "render_model_gradient",
    "render_train_step",
    "expression_step_work",
    "request_elements",
    "stream_steps",
]


def describe_model(request: DescribeRequest, limits: Limits) -> DescribeResponse:
    """The spec's weight layout, computed TF-free (the same checks as every model request)."""
    layout = model_layout(request.model.model_dump(), limits)
    state = None
    if request.optimizer is not None:
        state = [
            WeightDescription(name=s.name, shape=list(s.shape), trainable=False)
            for s in optimizer_state_layout(request.optimizer.model_dump(), layout)
        ]
    return DescribeResponse(
        weights=[
            WeightDescription(name=w.name, shape=list(w.shape), trainable=w.trainable) for w in layout.weights
        ],
        param_count=layout.param_count,
        trainable_count=layout.trainable_count,
        output_shape=list(layout.output_shape),
        layer_output_shapes=[list(s) for s in layout.output_shapes],
        optimizer_state=state,
    )


def request_elements(request: ModelGradientRequest | TrainStepRequest) -> int:
    """About how many elements the request's tensors hold, from shapes alone (nothing is decoded).

    Callers use it to decide where decoding runs; a claim that turns out false is caught by decoding.
    A model spec itself is bounded by max_layers (64 layers check in ~0.4 ms), so it never decides.
    """
    tensors = [request.x, request.y, *(request.weights or [])]
    if isinstance(request, TrainStepRequest):
        tensors += request.optimizer_state or []
    else:
        tensors += request.tangents or []
    return claimed_elements(t for t in tensors if t is not None)


def expression_step_work(request: ExpressionStepRequest, limits: Limits) -> RequestWork:
    """What ``build_expression_step_job`` will cost for this (parsed) request: decides where it runs."""
    tensors = [*request.variables.values(), *request.constants.values(), *(request.optimizer_state or [])]
    program = unchecked_chars(
        request.expression,
        list(request.variables),
        list(request.constants),
        job_functions(request.functions),
        limits,
    )
    return RequestWork(elements=claimed_elements(tensors), program_chars=program)


def _decode_list(values: list[Any] | None, name: str, dtype: str, limits: Limits) -> list[np.ndarray] | None:
    if values is None:
        return None
    return [
        decode_tensor(v, dtype, field=f"{name}[{i}]", max_elements=limits.max_params)
        for i, v in enumerate(values)
    ]


def _model_inputs(
    request: ModelGradientRequest | TrainStepRequest, limits: Limits
) -> tuple[dict[str, Any], ModelLayout, np.ndarray, np.ndarray | None, list[np.ndarray] | None]:
    """The spec (its layout checked) and the decoded x, y and weights; the job's check follows."""
    spec = request.model.model_dump()
    layout = model_layout(spec, limits)
    dtype = request.dtype
    x = decode_tensor(request.x, dtype, field="x", max_elements=limits.max_input_elements)
    y = None
    if request.y is not None:
        y = decode_tensor(request.y, dtype, field="y", max_elements=limits.max_input_elements)
    weights = _decode_list(request.weights, "weights", dtype, limits)
    return spec, layout, x, y, weights


def _loss(request: ModelGradientRequest | TrainStepRequest) -> dict[str, Any]:
    return request.loss.model_dump()


def build_model_gradient_job(request: ModelGradientRequest, limits: Limits) -> ModelGradientJob:
    """The engine job for a model gradient request, or the TapeserveError saying what is wrong."""
    spec, layout, x, y, weights = _model_inputs(request, limits)
    adversarial = None if request.adversarial is None else request.adversarial.model_dump()
    job = ModelGradientJob(
        model=spec,
        x=x,
        y=y,
        weights=weights,
        loss=_loss(request),
        wrt=tuple(dict.fromkeys(request.wrt)),
        tangents=_decode_list(request.tangents, "tangents", request.dtype, limits),
        saliency=request.saliency,
        adversarial=adversarial,
        training=request.training,
        dtype=request.dtype,
    )
    check_model_gradient_job(job, layout, limits)
    return job


def _clip(request: TrainStepRequest | ExpressionStepRequest) -> dict[str, float] | None:
    if request.clip is None:
        return None
    return {k: v for k, v in request.clip.model_dump().items() if v is not None}


def build_train_step_job(request: TrainStepRequest, limits: Limits) -> TrainStepJob:
    """The engine job for a train-step request, or the TapeserveError saying what is wrong."""
    check_steps(request.steps, limits)  # before anything is decoded; the job's check repeats it
    objective = request.objective
    spec, layout, x, y, weights = _model_inputs(request, limits)
    optimizer = request.optimizer.model_dump()
    state = _decode_list(request.optimizer_state, "optimizer_state", request.dtype, limits)
    actions = returns = None
    objective_data = objective.model_dump()
    if isinstance(objective, Reinforce):
        objective_data.pop("actions")
        objective_data.pop("returns")
        actions = np.asarray(objective.actions, request.dtype)
        returns = decode_tensor(
            objective.returns,
            request.dtype,
            field="objective.returns",
            max_elements=x.shape[0] if x.ndim else limits.max_batch,  # a scalar x is refused next
        )
    job = TrainStepJob(
        model=spec,
        x=x,
        y=y,
        weights=weights,
        optimizer=optimizer,
        optimizer_state=state,
        loss=_loss(request),
        clip=_clip(request),
        objective=objective_data,
        actions=actions,
        returns=returns,
        steps=request.steps,
        return_gradients=request.return_gradients,
        dtype=request.dtype,
    )
    check_train_step_job(job, layout, optimizer_state_layout(optimizer, layout), limits)
    return job


def build_expression_step_job(request: ExpressionStepRequest, limits: Limits) -> ExpressionStepJob:
    """The engine job for an expression step request, or the TapeserveError saying what is wrong."""
    # Before the text is parsed or a tensor decoded; the job's check repeats them.
    check_steps(request.steps, limits)
    check_input_count(len(request.variables) + len(request.constants), limits)
    functions = job_functions(request.functions)
    counts = check_program(
        request.expression, list(request.variables), list(request.constants), functions, limits
    )
    dtype = request.dtype
    cap = limits.max_input_elements
    variables = {
        k: decode_tensor(v, dtype, field=f"variables.{k}", max_elements=cap)
        for k, v in request.variables.items()
    }
    constants = {
        k: decode_tensor(v, dtype, field=f"constants.{k}", max_elements=cap)
        for k, v in request.constants.items()
    }
    optimizer = request.optimizer.model_dump()
    job = ExpressionStepJob(
        expression=request.expression,
        variables=variables,
        constants=constants,
        functions=functions,
        optimizer=optimizer,
        optimizer_state=_decode_list(request.optimizer_state, "optimizer_state", dtype, limits),
        clip=_clip(request),
        steps=request.steps,
        dtype=dtype,
        counts=counts,
    )
    check_expression_step_job(job, optimizer_state_layout(optimizer, variables_layout(variables)), limits)
    return job


def _history(history: list[StepRecord]) -> list[dict[str, float]]:
    return [
        {
            "loss": h.loss,
            "data_loss": h.data_loss,
            "regularization_loss": h.regularization_loss,
            "gradient_norm": h.gradient_norm,
            "clipped_gradient_norm": h.clipped_gradient_norm,
        }
        for h in history
    ]


def _meta(cache: str, compute_ms: float, total_ms: float) -> dict[str, Any]:
    return {"cache": cache, "compute_ms": round(compute_ms, 3), "total_ms": round(total_ms, 3)}


def render_model_gradient(result: ModelGradientResult, encoding: Encoding, total_ms: float) -> dict[str, Any]:
    def enc(a: Any) -> Any:
        return encode_tensor(a, encoding, keep_arrays=True)

    body: dict[str, Any] = {
        "loss": result.loss,
        "data_loss": result.data_loss,
        "regularization_loss": result.regularization_loss,
    }
    for name in ("weight_gradients", "hvp", "weights"):
        value = getattr(result, name)
        if value is not None:
            body[name] = [enc(a) for a in value]
    for name in ("input_gradients", "saliency", "x_adv"):
        value = getattr(result, name)
        if value is not None:
            body[name] = enc(value)
    if result.adversarial_loss is not None:
        body["adversarial_loss"] = result.adversarial_loss
    body["meta"] = _meta(result.cache, result.compute_ms, total_ms)
    return body


def render_train_step(
    results: list[TrainStepResult], encoding: Encoding, total_ms: float, steps: int
) -> dict[str, Any]:
    """The response of one or more chunks of steps (a streamed request runs several)."""
    last = results[-1]
    history = [h for r in results for h in r.history]

    def enc(a: Any) -> Any:
        return encode_tensor(a, encoding, keep_arrays=True)

    body: dict[str, Any] = _history(history[-1:])[0]
    body["weights"] = [enc(w) for w in last.weights]
    body["optimizer_state"] = [enc(s) for s in last.optimizer_state]
    if last.gradients is not None:
        body["gradients"] = [enc(g) for g in last.gradients]
    if steps > 1:
        body["history"] = _history(history)
    body["steps"] = steps
    body["meta"] = _meta(results[0].cache, sum(r.compute_ms for r in results), total_ms)
    return body


def render_expression_step(
    results: list[ExpressionStepResult], encoding: Encoding, total_ms: float, steps: int
) -> dict[str, Any]:
    last = results[-1]
    history = [h for r in results for h in r.history]
    body: dict[str, Any] = {
        "value": history[-1].loss,
        "gradient_norm": history[-1].gradient_norm,
        "clipped_gradient_norm": history[-1].clipped_gradient_norm,
        "variables": {k: encode_tensor(v, encoding, keep_arrays=True) for k, v in last.variables.items()},
        "optimizer_state": [encode_tensor(s, encoding, keep_arrays=True) for s in last.optimizer_state],
    }
    if steps > 1:
        body["history"] = _history(history)
    body["steps"] = steps
    body["meta"] = _meta(results[0].cache, sum(r.compute_ms for r in results), total_ms)
    return body


# --- running steps, in one pool job or in streamed chunks

StepJob = TrainStepJob | ExpressionStepJob
StepResult = TrainStepResult | ExpressionStepResult
NDJSON_MEDIA_TYPE = "application/x-ndjson"


def next_chunk(job: StepJob, previous: StepResult, steps: int) -> StepJob:
    """The job that continues ``previous``: its weights (or variables) and optimizer state fed back."""
    if isinstance(job, TrainStepJob):
        assert isinstance(previous, TrainStepResult)
        return dataclasses.replace(
            job, weights=previous.weights, optimizer_state=previous.optimizer_state, steps=steps
        )
    assert isinstance(previous, ExpressionStepResult)
    return dataclasses.replace(
        job, variables=previous.variables, optimizer_state=previous.optimizer_state, steps=steps
    )


def progress_line(done: int, total: int, record: StepRecord) -> dict[str, Any]:
    return {"type": "progress", "step": done, "steps": total, **_history([record])[0]}


def chunk_sizes(total: int, every: int) -> list[int]:
    """A streamed run of ``total`` steps cut into pool jobs of ``every`` steps (the last may be shorter)."""
    return [min(every, total - start) for start in range(0, total, every)]


async def stream_steps(
    first: StepResult,
    job: StepJob,
    sizes: list[int],
    run: Callable[[StepJob], Awaitable[StepResult]],
    render: Callable[[list[StepResult]], dict[str, Any]],
) -> AsyncIterator[bytes]:
    """NDJSON lines: progress after each chunk, then the result, or a final error line with the problem.

    Holds one chunk's tensors at a time: the last result (whose weights and state feed the next
    chunk) and the small per-step history; earlier chunks' arrays are dropped as soon as the next
    chunk's result arrives. ``run`` enforces the stream's deadline; a closed or cancelled stream
    (the client went away) starts no further chunk.
    """
    total = sum(sizes)
    history = list(first.history)
    cache, compute_ms = first.cache, first.compute_ms
    last = first
    del first
    job = next_chunk(job, last, job.steps)  # drop the request's own arrays: ``last`` replaces them
    done = sizes[0]
    yield _line(progress_line(done, total, history[-1]))
    try:
        for size in sizes[1:]:
            job = next_chunk(job, last, size)
            result = await run(job)
            job = next_chunk(job, result, size)  # forget the previous chunk's arrays now
            last = result
            del result
            history.extend(last.history)
            compute_ms += last.compute_ms
            done += size
            yield _line(progress_line(done, total, history[-1]))
        # One result standing for all chunks: the last arrays, every step's history, the summed time.
        whole = dataclasses.replace(last, history=history, cache=cache, compute_ms=compute_ms)
        rendered = await run_in_threadpool(render, [whole])
        yield _line({"type": "result", **rendered})
    except TapeserveError as error:
        yield _line({"type": "error", "problem": error.to_dict()})
    except Exception as error:  # the status line is gone: the problem goes into the stream instead
        yield _line({"type": "error", "problem": as_tapeserve_error(error, "stream").to_dict()})


def _line(obj: dict[str, Any]) -> bytes:
    return wire.dumps(obj) + b"\n"
