"""POST /v1/step: clipped optimizer steps minimizing a scalar expression over its variables."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State
from starlette.responses import Response

from service.api.deps import GradientPool, PoolDep, SettingsDep, TapeserveRoute
from service.api.fastpath import FastEndpoint
from service.api.model_job import build_expression_step_job, expression_step_work, render_expression_step
from service.api.model_schemas import ExpressionStepRequest, ExpressionStepResponse
from service.api.offload import ON_LOOP_ELEMENTS, off_loop_if
from service.api.routes.model import PROBLEMS, STREAM_RESPONSE, check_timeout, expect_result, run_steps
from service.api.settings import Settings
from service.engine.jobs import ExpressionStepResult

__all__ = ["FAST_STEP", "router", "run_expression_step"]

router = APIRouter(route_class=TapeserveRoute, tags=["gradient"])


async def run_expression_step(
    body: ExpressionStepRequest, settings: Settings, pool: GradientPool
) -> dict[str, Any]:
    """The JSON content of a validated, unstreamed /v1/step request (fast path)."""
    timeout_s = check_timeout(body.timeout_s, settings)
    limits = settings.limits()
    costly = expression_step_work(body, limits).costly
    job = await off_loop_if(costly, build_expression_step_job, body, limits)
    started = time.perf_counter()
    result: ExpressionStepResult = expect_result(
        await pool.run(job, timeout_s=timeout_s, affinity=job.signature()), ExpressionStepResult
    )
    total_ms = (time.perf_counter() - started) * 1000.0
    elements = sum(a.size for a in [*result.variables.values(), *result.optimizer_state])
    return await off_loop_if(
        elements > ON_LOOP_ELEMENTS, render_expression_step, [result], body.encoding, total_ms, body.steps
    )


async def _fast_step(body: ExpressionStepRequest, state: State, body_bytes: int) -> dict[str, Any]:
    return await run_expression_step(body, state.settings, state.pool)


# Served by service.api.fastpath, except streams (the route writes those as NDJSON).
FAST_STEP = FastEndpoint(
    ExpressionStepRequest, _fast_step, accepts=lambda body: not body.stream or body.steps == 1
)


async def expression_step(body: ExpressionStepRequest, pool: PoolDep, settings: SettingsDep) -> Response:
    """Run one or more clipped optimizer steps minimizing a scalar expression; NDJSON progress with stream."""
    timeout_s = check_timeout(body.timeout_s, settings)
    job = await run_in_threadpool(build_expression_step_job, body, settings.limits())
    return await run_steps(
        job,
        stream=body.stream,
        every=body.progress_every,
        pool=pool,
        timeout_s=timeout_s,
        result_type=ExpressionStepResult,
        render=render_expression_step,
        encoding=body.encoding,
    )


router.add_api_route(
    "/v1/step",
    expression_step,
    methods=["POST"],
    operation_id="expression_step",
    response_model=None,
    responses={
        200: {
            "model": ExpressionStepResponse,
            "description": "New variables and optimizer state (JSON), or NDJSON progress lines with stream.",
            "content": STREAM_RESPONSE,
        },
        **PROBLEMS,
    },
)
