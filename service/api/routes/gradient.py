"""POST /v1/gradient: the value and the requested derivatives of an expression."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from starlette.datastructures import State

from service.api.batching import Batcher
from service.api.deps import BatcherDep, OrjsonResponse, SettingsDep, TapeserveRoute
from service.api.fastpath import FastEndpoint
from service.api.gradient_job import build_gradient_job, render_gradient_result, request_work
from service.api.offload import ON_LOOP_ELEMENTS, off_loop_if
from service.api.schemas import GradientRequest, GradientResponse, Problem
from service.api.settings import Settings
from service.engine.jobs import GradientResult
from service.errors import InvalidRequest, TapeserveError

__all__ = ["FAST_ENDPOINT", "gradient_content", "router"]

router = APIRouter(route_class=TapeserveRoute, tags=["gradient"])

_PROBLEMS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": Problem,
        "description": "Malformed JSON, or an expression that does not parse or resolve.",
    },
    413: {"model": Problem, "description": "The body is larger than max_body_bytes."},
    415: {"model": Problem, "description": "The body is not application/json."},
    422: {"model": Problem, "description": "Invalid request, shape/dtype error, or a limit exceeded."},
    503: {"model": Problem, "description": "Overloaded (with Retry-After) or the worker crashed."},
    504: {"model": Problem, "description": "The computation exceeded its deadline."},
}


def _result_elements(result: GradientResult) -> int:
    total = result.value.size
    for name in ("gradient", "jacobian", "hvp", "vjp"):
        total += sum(a.size for a in (getattr(result, name) or {}).values())
    total += sum(a.size for row in (result.hessian or {}).values() for a in row.values())
    return total


async def gradient_content(body: GradientRequest, settings: Settings, batcher: Batcher) -> dict[str, Any]:
    """The response content for a validated request; the FastAPI route and the fast path both call it."""
    if body.timeout_s is not None and body.timeout_s > settings.request_timeout_s:
        raise InvalidRequest(
            f"timeout_s may be at most {settings.request_timeout_s} (the server's request_timeout_s)",
            field="timeout_s",
        )
    limits = settings.limits()
    job = await off_loop_if(request_work(body, limits).costly, build_gradient_job, body, limits)
    started = time.perf_counter()
    result = await batcher.run(
        job, timeout_s=body.timeout_s or settings.request_timeout_s, affinity=job.signature()
    )
    total_ms = (time.perf_counter() - started) * 1000.0
    if not isinstance(result, GradientResult):
        raise TapeserveError(f"the worker returned {type(result).__name__}, not a GradientResult")
    costly = _result_elements(result) > ON_LOOP_ELEMENTS
    return await off_loop_if(costly, render_gradient_result, result, job, body.encoding, total_ms)


async def _fast_gradient(body: GradientRequest, state: State, body_bytes: int) -> dict[str, Any]:
    return await gradient_content(body, state.settings, state.batcher)


# Served by service.api.fastpath on the hot path; the route below documents it and answers every
# request the fast path hands over (bodies that do not parse or validate).
FAST_ENDPOINT = FastEndpoint(GradientRequest, _fast_gradient)


async def compute_gradient(
    body: GradientRequest, batcher: BatcherDep, settings: SettingsDep
) -> OrjsonResponse:
    """Compute the value and the requested derivatives of an expression."""
    return OrjsonResponse(await gradient_content(body, settings, batcher))


router.add_api_route(
    "/v1/gradient",
    compute_gradient,
    methods=["POST"],
    operation_id="compute_gradient",
    response_model=None,
    responses={
        200: {"model": GradientResponse, "description": "The value and the requested derivatives."},
        **_PROBLEMS,
    },  # fmt: skip
)
# The path the design card names; the same handler, kept out of the schema so clients use /v1.
router.add_api_route(
    "/gradient",
    compute_gradient,
    methods=["POST"],
    operation_id="compute_gradient_unversioned",
    response_model=None,
    include_in_schema=False,
)
