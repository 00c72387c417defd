"""The endpoint table: every computing POST of /v1, declared once.

Each entry names its path, body model, OpenAPI operation and the steps of its one path: how much
work its request is (where the job is built), the TF-free job builder (which refuses bad requests
before a worker sees them), the result type and the renderer. ``router()`` makes the FastAPI
routes (the schema, and every request the fast path hands over) and ``fast_endpoints()`` the raw
ASGI fast path's table from the same entries, and both run ``serve``: one path per request, whichever
door it came through. A new endpoint is one entry here, one job kind and one engine module.

The handlers take what they need from ``app.state`` (settings, pool, batcher): FastAPI dependencies
would be skipped by the fast path, so there are none.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.datastructures import State
from starlette.responses import Response

from service.api import gradient_job, model_job
from service.api.deps import OrjsonResponse, TapeserveRoute
from service.api.fastpath import FastEndpoint
from service.api.model_schemas import (
    DescribeRequest,
    DescribeResponse,
    ExpressionStepRequest,
    ExpressionStepResponse,
    ModelGradientRequest,
    ModelGradientResponse,
    TrainStepRequest,
    TrainStepResponse,
)
from service.api.offload import ON_LOOP_ELEMENTS, RequestWork, off_loop_if
from service.api.schemas import GradientRequest, GradientResponse, Problem
from service.api.settings import Settings
from service.api.streaming import STREAM_RESPONSE, expect_result, stream_step_job
from service.errors import InvalidRequest
from service.jobs import ExpressionStepResult, GradientResult, ModelGradientResult, TrainStepResult
from service.limits import Limits

__all__ = ["ENDPOINTS", "Endpoint", "check_timeout", "fast_endpoints", "router", "serve"]

_BAD_BODY = {
    "model": Problem,
    "description": "Malformed JSON, or an expression that does not parse or resolve.",
}
_TOO_LARGE = {"model": Problem, "description": "The body is larger than max_body_bytes."}
_NOT_JSON = {"model": Problem, "description": "The body is not application/json."}
_BUSY = {"model": Problem, "description": "Overloaded (with Retry-After) or the worker crashed."}
_LATE = {"model": Problem, "description": "The computation exceeded its deadline."}
EXPRESSION_PROBLEMS: dict[int | str, dict[str, Any]] = {
    400: _BAD_BODY,
    413: _TOO_LARGE,
    415: _NOT_JSON,
    422: {"model": Problem, "description": "Invalid request, shape/dtype error, or a limit exceeded."},
    503: _BUSY,
    504: _LATE,
}
MODEL_PROBLEMS: dict[int | str, dict[str, Any]] = {
    **EXPRESSION_PROBLEMS,
    422: {
        "model": Problem,
        "description": "Invalid spec or request (`field` names the offending path), shape error, or a limit.",
    },
}


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """One POST endpoint: its wire contract and the steps ``serve`` takes for it."""

    path: str
    body: type[BaseModel]
    operation_id: str
    summary: str  # one line; also the OpenAPI description
    tag: str
    responses: Mapping[int | str, dict[str, Any]]
    # Served without the pool: the answer straight from the request (validated body, limits).
    answer: Callable[[Any, Limits], Any] | None = None
    response_model: type[BaseModel] | None = None  # for ``answer`` endpoints: FastAPI renders it
    # Served by a pool job: what building it costs, the builder, the result it promises, the renderer
    # (body, job, result, total_ms) -> content and the size of a result (where rendering runs).
    work: Callable[[Any, Limits], RequestWork] | None = None
    build: Callable[[Any, Limits], Any] | None = None
    result_type: type | None = None
    render: Callable[[Any, Any, Any, float], dict[str, Any]] | None = None
    result_elements: Callable[[Any], int] = lambda result: 0
    batched: bool = False  # through the dynamic batcher (GradientJobs only)
    # Step endpoints: (body, results, total_ms) -> content, for one result or a stream's chunks.
    render_steps: Callable[[Any, list[Any], float], dict[str, Any]] | None = None
    hidden_paths: tuple[str, ...] = ()  # served the same, left out of the schema
    fast: bool = True  # on the raw ASGI fast path (streams never are)

    def streams(self, body: Any) -> bool:
        return self.render_steps is not None and bool(body.stream) and body.steps > 1


def check_timeout(timeout_s: float | None, settings: Settings) -> float:
    """The request's deadline: its own ``timeout_s`` (at most the server's), else the server's."""
    if timeout_s is not None and timeout_s > settings.request_timeout_s:
        raise InvalidRequest(
            f"timeout_s may be at most {settings.request_timeout_s} (the server's request_timeout_s)",
            field="timeout_s",
        )
    return timeout_s or settings.request_timeout_s


async def serve(endpoint: Endpoint, body: Any, state: State) -> Any:
    """The one path of a validated request: JSON content, a pydantic answer, or a stream.

    Raises TapeserveError for every problem a client can cause; the caller renders problem+json.
    """
    settings: Settings = state.settings
    limits = settings.limits()
    if endpoint.answer is not None:
        return endpoint.answer(body, limits)
    assert endpoint.work and endpoint.build and endpoint.result_type
    timeout_s = check_timeout(body.timeout_s, settings)
    job = await off_loop_if(endpoint.work(body, limits).costly, endpoint.build, body, limits)
    if endpoint.streams(body):
        steps = endpoint.render_steps
        assert steps is not None
        return await stream_step_job(
            job,
            every=body.progress_every,
            pool=state.pool,
            timeout_s=timeout_s,
            result_type=endpoint.result_type,
            render=lambda results, total_ms: steps(body, results, total_ms),
        )
    runner = state.batcher if endpoint.batched else state.pool
    started = time.perf_counter()
    result = await runner.run(job, timeout_s=timeout_s, affinity=job.signature())
    result = expect_result(result, endpoint.result_type)
    total_ms = (time.perf_counter() - started) * 1000.0
    costly = endpoint.result_elements(result) > ON_LOOP_ELEMENTS
    if endpoint.render_steps is not None:
        return await off_loop_if(costly, endpoint.render_steps, body, [result], total_ms)
    assert endpoint.render is not None
    return await off_loop_if(costly, endpoint.render, body, job, result, total_ms)


# --- the table -----------------------------------------------------------------------------------


def _sizes(*arrays: Any) -> int:
    return sum(a.size for a in arrays if a is not None)


def _gradient_elements(result: GradientResult) -> int:
    total = result.value.size
    for name in ("gradient", "jacobian", "hvp", "vjp"):
        total += sum(a.size for a in (getattr(result, name) or {}).values())
    return total + sum(a.size for row in (result.hessian or {}).values() for a in row.values())


def _model_work(body: ModelGradientRequest | TrainStepRequest, limits: Limits) -> RequestWork:
    return RequestWork(elements=model_job.request_elements(body))


GRADIENT = Endpoint(
    path="/v1/gradient",
    hidden_paths=("/gradient",),  # the path the design card names; clients use /v1
    body=GradientRequest,
    operation_id="compute_gradient",
    summary="Compute the value and the requested derivatives of an expression.",
    tag="gradient",
    responses={
        200: {"model": GradientResponse, "description": "The value and the requested derivatives."},
        **EXPRESSION_PROBLEMS,
    },
    work=gradient_job.request_work,
    build=gradient_job.build_gradient_job,
    result_type=GradientResult,
    render=lambda body, job, result, total_ms: gradient_job.render_gradient_result(
        result, job, body.encoding, total_ms
    ),
    result_elements=_gradient_elements,
    batched=True,
)
STEP = Endpoint(
    path="/v1/step",
    body=ExpressionStepRequest,
    operation_id="expression_step",
    summary="Run one or more clipped optimizer steps minimizing a scalar expression; NDJSON progress "
    "with stream.",
    tag="gradient",
    responses={
        200: {
            "model": ExpressionStepResponse,
            "description": "New variables and optimizer state (JSON), or NDJSON progress lines with stream.",
            "content": STREAM_RESPONSE,
        },
        **MODEL_PROBLEMS,
    },
    work=model_job.expression_step_work,
    build=model_job.build_expression_step_job,
    result_type=ExpressionStepResult,
    render_steps=lambda body, results, total_ms: model_job.render_expression_step(
        results, body.encoding, total_ms, body.steps
    ),
    result_elements=lambda r: _sizes(*r.variables.values(), *r.optimizer_state),
)
DESCRIBE = Endpoint(
    path="/v1/model/describe",
    body=DescribeRequest,
    operation_id="describe_model",
    summary="Describe a model spec's weights (get_weights() order), parameter count and optimizer "
    "state layout.",
    tag="models",
    responses={k: v for k, v in MODEL_PROBLEMS.items() if k in (400, 413, 415, 422)},
    answer=model_job.describe_model,
    response_model=DescribeResponse,
    fast=False,  # a pydantic answer, rendered by FastAPI
)
MODEL_GRADIENT = Endpoint(
    path="/v1/model/gradient",
    body=ModelGradientRequest,
    operation_id="model_gradient",
    summary="Compute a model's loss and gradients w.r.t. weights and/or inputs, HVP, saliency or "
    "adversarial x.",
    tag="models",
    responses={200: {"model": ModelGradientResponse, "description": "Loss and gradients."}, **MODEL_PROBLEMS},
    work=_model_work,
    build=model_job.build_model_gradient_job,
    result_type=ModelGradientResult,
    render=lambda body, job, result, total_ms: model_job.render_model_gradient(
        result, body.encoding, total_ms
    ),
    result_elements=lambda r: _sizes(
        *(r.weights or []),
        *(r.weight_gradients or []),
        *(r.hvp or []),
        r.input_gradients,
        r.saliency,
        r.x_adv,
    ),
)
TRAIN_STEP = Endpoint(
    path="/v1/model/train-step",
    body=TrainStepRequest,
    operation_id="train_step",
    summary="Run one or more clipped optimizer steps of a model; NDJSON progress with stream.",
    tag="models",
    responses={
        200: {
            "model": TrainStepResponse,
            "description": "New weights and optimizer state (JSON), or NDJSON progress lines with stream.",
            "content": STREAM_RESPONSE,
        },
        **MODEL_PROBLEMS,
    },
    work=_model_work,
    build=model_job.build_train_step_job,
    result_type=TrainStepResult,
    render_steps=lambda body, results, total_ms: model_job.render_train_step(
        results, body.encoding, total_ms, body.steps
    ),
    result_elements=lambda r: _sizes(*r.weights, *r.optimizer_state, *(r.gradients or [])),
)

ENDPOINTS: tuple[Endpoint, ...] = (GRADIENT, STEP, DESCRIBE, MODEL_GRADIENT, TRAIN_STEP)


# --- the two doors -------------------------------------------------------------------------------


def _handler(endpoint: Endpoint) -> Callable[..., Any]:
    async def handle(body: Any, request: Request) -> Any:
        content = await serve(endpoint, body, request.app.state)
        if isinstance(content, Response | BaseModel):
            return content
        return OrjsonResponse(content)

    # FastAPI reads the body model from the signature: the entry's model, not ``Any``.
    handle.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter("body", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=endpoint.body),
            inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
        ]
    )
    handle.__name__ = endpoint.operation_id
    handle.__doc__ = endpoint.summary
    return handle


def router(endpoints: tuple[Endpoint, ...] = ENDPOINTS) -> APIRouter:
    """The FastAPI routes of ``endpoints``: the OpenAPI schema, and every request the fast path hands over."""
    routes = APIRouter(route_class=TapeserveRoute)
    for endpoint in endpoints:
        handler = _handler(endpoint)
        for path in (endpoint.path, *endpoint.hidden_paths):
            hidden = path != endpoint.path
            routes.add_api_route(
                path,
                handler,
                methods=["POST"],
                operation_id=endpoint.operation_id + ("_unversioned" if hidden else ""),
                summary=endpoint.summary,
                tags=[endpoint.tag],
                response_model=endpoint.response_model,
                responses=None if hidden else dict(endpoint.responses),
                include_in_schema=not hidden,
            )
    return routes


def fast_endpoints(endpoints: tuple[Endpoint, ...] = ENDPOINTS) -> dict[str, FastEndpoint]:
    """The fast path's table: the same entries, answered by the same ``serve``."""
    table: dict[str, FastEndpoint] = {}
    for endpoint in endpoints:
        if not endpoint.fast:
            continue

        async def run(body: Any, state: State, body_bytes: int, endpoint: Endpoint = endpoint) -> Any:
            return await serve(endpoint, body, state)

        # Step endpoints: streams are written by the route (the fast path answers whole bodies only).
        accepts = (lambda body, e=endpoint: not e.streams(body)) if endpoint.render_steps else None
        for path in (endpoint.path, *endpoint.hidden_paths):
            table[path] = FastEndpoint(endpoint.body, run, accepts)
    return table
