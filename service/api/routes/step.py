"""POST /v1/step: clipped optimizer steps minimizing a scalar expression over its variables."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api.deps import PoolDep, SettingsDep, TapeserveRoute
from service.api.model_job import build_expression_step_job, render_expression_step
from service.api.model_schemas import ExpressionStepRequest, ExpressionStepResponse
from service.api.routes.model import PROBLEMS, STREAM_RESPONSE, check_timeout, run_steps
from service.engine.jobs import ExpressionStepResult

__all__ = ["router"]

router = APIRouter(route_class=TapeserveRoute, tags=["gradient"])


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
