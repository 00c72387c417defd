"""POST /v1/model/describe, /v1/model/gradient and /v1/model/train-step: model specs over the worker pool."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.api.deps import (
    GradientPool,
    OrjsonResponse,
    PoolDep,
    SettingsDep,
    TapeserveRoute,
)
from service.api.fastpath import FastEndpoint
from service.api.model_job import (
    NDJSON_MEDIA_TYPE,
    StepJob,
    StepResult,
    build_model_gradient_job,
    build_train_step_job,
    chunk_sizes,
    describe_model,
    render_model_gradient,
    render_train_step,
    request_elements,
    stream_steps,
)
from service.api.model_schemas import (
    DescribeRequest,
    DescribeResponse,
    ModelGradientRequest,
    ModelGradientResponse,
    TrainStepRequest,
    TrainStepResponse,
)
from service.api.offload import ON_LOOP_ELEMENTS
from service.api.schemas import Problem
from service.api.settings import Settings
from service.engine.jobs import ModelGradientResult, TrainStepJob, TrainStepResult
from service.errors import InvalidRequest, TapeserveError, Timeout

__all__ = [
    "FAST_MODEL_GRADIENT",
    "FAST_TRAIN_STEP",
    "PROBLEMS",
    "STREAM_RESPONSE",
    "check_timeout",
    "expect_result",
    "router",
    "run_model_gradient",
    "run_steps",
    "run_train_step",
]

router = APIRouter(route_class=TapeserveRoute, tags=["models"])

PROBLEMS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": Problem,
        "description": "Malformed JSON, or an expression that does not parse or resolve.",
    },
    413: {"model": Problem, "description": "The body is larger than max_body_bytes."},
    415: {"model": Problem, "description": "The body is not application/json."},
    422: {
        "model": Problem,
        "description": "Invalid spec or request (`field` names the offending path), shape error, or a limit.",
    },
    503: {"model": Problem, "description": "Overloaded (with Retry-After) or the worker crashed."},
    504: {"model": Problem, "description": "The computation exceeded its deadline."},
}
STREAM_RESPONSE: dict[str, Any] = {
    NDJSON_MEDIA_TYPE: {
        "schema": {
            "type": "string",
            "description": (
                'With "stream": true and steps > 1: one JSON object per line: {"type": "progress", "step", '
                '"steps", "loss", ...} after each chunk, then {"type": "result", ...the JSON response} or '
                '{"type": "error", "problem": {...}}.'
            ),
        }
    }
}


def check_timeout(timeout_s: float | None, settings: Settings) -> float:
    if timeout_s is not None and timeout_s > settings.request_timeout_s:
        raise InvalidRequest(
            f"timeout_s may be at most {settings.request_timeout_s} (the server's request_timeout_s)",
            field="timeout_s",
        )
    return timeout_s or settings.request_timeout_s


def expect_result(result: Any, kind: type) -> Any:
    """The worker's result, if it is of the kind the job promises (else it is our bug: a 500)."""
    if not isinstance(result, kind):
        raise TapeserveError(f"the worker returned {type(result).__name__}, not a {kind.__name__}")
    return result


async def run_steps(
    job: StepJob,
    *,
    stream: bool,
    every: int,
    pool: PoolDep,
    timeout_s: float,
    result_type: type,
    render: Any,
    encoding: Any,
) -> Response:
    """All steps in one pool job, or (stream) chunks of ``every`` steps, each fed the previous state.

    ``timeout_s`` is the deadline of the whole request, a stream included: each chunk's pool job
    gets only the time left, and a stream whose time is used up ends with a timeout error line.
    """
    started = time.perf_counter()
    deadline = started + timeout_s
    total = job.steps
    streaming = stream and total > 1

    async def run(chunk: StepJob) -> StepResult:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise Timeout(f"the steps did not finish within {timeout_s:g} s", timeout_s=timeout_s)
        try:
            budget = left if streaming else timeout_s  # one job: the pool's own deadline, as before
            result = await pool.run(chunk, timeout_s=budget, affinity=chunk.signature())
        except Timeout as error:
            if streaming:  # the pool names this chunk's share of the time; the deadline is the stream's
                error.detail = f"the steps did not finish within {timeout_s:g} s: {error.detail}"
                error.extra["timeout_s"] = timeout_s
            raise
        checked: StepResult = expect_result(result, result_type)
        return checked

    if not streaming:
        result = await run(job)
        body = await run_in_threadpool(
            render, [result], encoding, (time.perf_counter() - started) * 1000.0, total
        )
        return OrjsonResponse(body)
    sizes = chunk_sizes(total, every)
    first_job = job if sizes[0] == total else _resized(job, sizes[0])
    # The first chunk runs before the response starts, so its errors still get a proper status code.
    first = await run(first_job)

    def render_all(results: list[StepResult]) -> dict[str, Any]:
        out: dict[str, Any] = render(results, encoding, (time.perf_counter() - started) * 1000.0, total)
        return out

    return _StepStream(stream_steps(first, first_job, sizes, run, render_all), media_type=NDJSON_MEDIA_TYPE)


class _StepStream(StreamingResponse):
    """A StreamingResponse that always watches for the client's disconnect while it streams.

    Starlette listens for ``http.disconnect`` (and cancels the stream, so the pending chunk's
    ``pool.run`` and every later chunk) only for ASGI spec versions below 2.4; from 2.4 on it would
    notice only when the next line fails to send, after computing one more chunk. Steps are too
    costly for that, so the stream is always cancelled as soon as the client goes away.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": "2.3"}}
        await super().__call__(scope, receive, send)


def _resized(job: StepJob, steps: int) -> StepJob:
    return dataclasses.replace(job, steps=steps)


async def describe(body: DescribeRequest, settings: SettingsDep) -> DescribeResponse:
    """Describe a model spec's weights (get_weights() order), parameter count and optimizer state layout."""
    return describe_model(body, settings.limits())


async def run_model_gradient(
    body: ModelGradientRequest, settings: Settings, pool: GradientPool
) -> dict[str, Any]:
    """The JSON response content of a validated model-gradient request (route and fast path)."""
    timeout_s = check_timeout(body.timeout_s, settings)
    limits = settings.limits()
    large = request_elements(body) > ON_LOOP_ELEMENTS
    if large:
        job = await run_in_threadpool(build_model_gradient_job, body, limits)
    else:
        job = build_model_gradient_job(body, limits)
    started = time.perf_counter()
    result = expect_result(
        await pool.run(job, timeout_s=timeout_s, affinity=job.signature()), ModelGradientResult
    )
    total_ms = (time.perf_counter() - started) * 1000.0
    if large or _gradient_elements(result) > ON_LOOP_ELEMENTS:
        return await run_in_threadpool(render_model_gradient, result, body.encoding, total_ms)
    return render_model_gradient(result, body.encoding, total_ms)


def _gradient_elements(result: ModelGradientResult) -> int:
    arrays = [*(result.weights or []), *(result.weight_gradients or []), *(result.hvp or [])]
    arrays += [a for a in (result.input_gradients, result.saliency, result.x_adv) if a is not None]
    return sum(a.size for a in arrays)


async def _fast_model_gradient(body: ModelGradientRequest, state: State, body_bytes: int) -> dict[str, Any]:
    return await run_model_gradient(body, state.settings, state.pool)


FAST_MODEL_GRADIENT = FastEndpoint(ModelGradientRequest, _fast_model_gradient)


async def model_gradient(body: ModelGradientRequest, pool: PoolDep, settings: SettingsDep) -> OrjsonResponse:
    """Compute a model's loss and gradients w.r.t. weights and/or inputs, HVP, saliency or adversarial x."""
    return OrjsonResponse(await run_model_gradient(body, settings, pool))


async def run_train_step(body: TrainStepRequest, settings: Settings, pool: GradientPool) -> dict[str, Any]:
    """The JSON response content of a validated train-step request: all its steps in one pool job.

    Independent of FastAPI's Request, so a raw ASGI fast path can serve the route through it. It
    does not stream: ``stream`` is honoured by the route, which calls this for every other request.
    Raises TapeserveError for every problem (the caller renders problem+json).
    """
    timeout_s = check_timeout(body.timeout_s, settings)
    limits = settings.limits()
    large = request_elements(body) > ON_LOOP_ELEMENTS
    job: TrainStepJob
    if large:
        job = await run_in_threadpool(build_train_step_job, body, limits)
    else:
        job = build_train_step_job(body, limits)
    started = time.perf_counter()
    result = await pool.run(job, timeout_s=timeout_s, affinity=job.signature())
    checked: TrainStepResult = expect_result(result, TrainStepResult)
    total_ms = (time.perf_counter() - started) * 1000.0
    if large or _result_elements(checked) > ON_LOOP_ELEMENTS:
        return await run_in_threadpool(render_train_step, [checked], body.encoding, total_ms, body.steps)
    return render_train_step([checked], body.encoding, total_ms, body.steps)


async def _fast_train_step(body: TrainStepRequest, state: State, body_bytes: int) -> dict[str, Any]:
    return await run_train_step(body, state.settings, state.pool)


# Served by service.api.fastpath, except streams (the route writes those as NDJSON).
FAST_TRAIN_STEP = FastEndpoint(
    TrainStepRequest, _fast_train_step, accepts=lambda body: not body.stream or body.steps == 1
)


def _result_elements(result: TrainStepResult) -> int:
    arrays = [*result.weights, *result.optimizer_state, *(result.gradients or [])]
    return sum(a.size for a in arrays)


async def train_step(body: TrainStepRequest, pool: PoolDep, settings: SettingsDep) -> Response:
    """Run one or more clipped optimizer steps of a model; NDJSON progress with stream."""
    if not body.stream or body.steps == 1:
        return OrjsonResponse(await run_train_step(body, settings, pool))
    timeout_s = check_timeout(body.timeout_s, settings)
    job: TrainStepJob = await run_in_threadpool(build_train_step_job, body, settings.limits())
    return await run_steps(
        job,
        stream=True,
        every=body.progress_every,
        pool=pool,
        timeout_s=timeout_s,
        result_type=TrainStepResult,
        render=render_train_step,
        encoding=body.encoding,
    )


router.add_api_route(
    "/v1/model/describe",
    describe,
    methods=["POST"],
    operation_id="describe_model",
    response_model=DescribeResponse,
    responses={k: v for k, v in PROBLEMS.items() if k in (400, 413, 415, 422)},
)
router.add_api_route(
    "/v1/model/gradient",
    model_gradient,
    methods=["POST"],
    operation_id="model_gradient",
    response_model=None,
    responses={200: {"model": ModelGradientResponse, "description": "Loss and gradients."}, **PROBLEMS},
)
router.add_api_route(
    "/v1/model/train-step",
    train_step,
    methods=["POST"],
    operation_id="train_step",
    response_model=None,
    responses={
        200: {
            "model": TrainStepResponse,
            "description": "New weights and optimizer state (JSON), or NDJSON progress lines with stream.",
            "content": STREAM_RESPONSE,
        },
        **PROBLEMS,
    },
)
