"""The FastAPI application: routers, error handlers, body limit, and the worker pool's lifetime."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service.api.batching import Batcher
from service.api.body_limit import BodyLimitMiddleware
from service.api.deps import GradientPool, OrjsonResponse
from service.api.problems import install_problem_handlers
from service.api.routes import functions, gradient, health, model, step, umbridge
from service.api.schemas import TENSOR_COMPONENTS
from service.api.settings import Settings
from service.umbridge import UMModel, load_models_file

__all__ = ["create_app"]

log = logging.getLogger("tapeserve.api")

_DESCRIPTION = """\
Exact derivatives of expressions with tf.GradientTape, over HTTP: gradients, Jacobians, Hessians,
Hessian- and Jacobian-vector products, higher orders and custom gradients.

Every error is `application/problem+json` (RFC 9457) with a stable `code`.
`POST /gradient` is an alias of `POST /v1/gradient`.
"""


def _worker_pool(settings: Settings) -> GradientPool:
    from service.workers import WorkerPool  # the pool imports the engine only in its child processes

    pool: GradientPool = WorkerPool(settings.pool_config())
    return pool


def _umbridge_models(settings: Settings) -> dict[str, UMModel]:
    if settings.models is None:
        return {}
    return load_models_file(settings.models, settings.limits())


def create_app(settings: Settings | None = None, *, pool: GradientPool | None = None) -> FastAPI:
    """The application; its lifespan starts the worker pool (or ``pool``, for tests) and stops it."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker_pool = pool if pool is not None else _worker_pool(settings)
        app.state.pool = worker_pool
        app.state.batcher = Batcher(worker_pool, settings.batch_window_ms / 1000.0, settings.batch_max)
        await worker_pool.start()  # returns at once; /readyz turns 200 when a worker is warm
        try:
            yield
        finally:
            await worker_pool.close(settings.shutdown_grace_s)

    app = FastAPI(
        title="tapeserve",
        version="0.1.0",
        summary="A REST gradient-computation service.",
        description=_DESCRIPTION,
        default_response_class=OrjsonResponse,
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.umbridge_models = _umbridge_models(settings)
    install_problem_handlers(app)
    for module in (gradient, step, model, functions, health, umbridge):
        app.include_router(module.router)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    # Outside the body limit, so its 413 under /umbridge also becomes the protocol's error body.
    app.add_middleware(umbridge.UMBridgeErrorsMiddleware)
    _add_tensor_schemas(app)
    return app


def _add_tensor_schemas(app: FastAPI) -> None:
    """Tensor fields refer to named schemas that pydantic does not generate; add them to the document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(TENSOR_COMPONENTS)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
