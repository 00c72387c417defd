"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import BatcherDep, OrjsonResponse, PoolDep, TapeserveRoute
from service.api.schemas import Liveness, Readiness

__all__ = ["router"]

router = APIRouter(route_class=TapeserveRoute, tags=["health"])


@router.get("/healthz", operation_id="check_liveness", response_model=Liveness)
async def check_liveness() -> Liveness:
    """Report that the API process is alive (needs no worker)."""
    return Liveness(status="ok")


@router.get(
    "/readyz",
    operation_id="check_readiness",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "No worker is warm yet."}},
)
async def check_readiness(pool: PoolDep, batcher: BatcherDep) -> OrjsonResponse:
    """Report whether at least one worker is warm, with the pool's status."""
    ready = pool.ready
    batching = {"stacked_calls": batcher.stacked_calls, "stacked_requests": batcher.stacked_requests}
    body = Readiness(status="ready" if ready else "starting", pool=pool.status(), batching=batching)
    return OrjsonResponse(body.model_dump(), status_code=200 if ready else 503)
