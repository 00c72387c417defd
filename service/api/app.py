"""The FastAPI application: routers, error handlers, body limit, and the worker pool's lifetime."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute

from service.api import endpoints
from service.api.batching import Batcher
from service.api.body_limit import BodyLimitMiddleware
from service.api.brake import RefusalBrake
from service.api.deps import GradientPool, OrjsonResponse
from service.api.fastpath import FastPathMiddleware
from service.api.logging import RequestContextMiddleware
from service.api.metrics import MeteredPool, Metrics
from service.api.metrics import router as metrics_router
from service.api.problems import document_problem_media_type, install_problem_handlers
from service.api.ratelimit import make_limiter
from service.api.routes import functions, health, playground, umbridge
from service.api.schemas import TENSOR_COMPONENTS
from service.api.security import AuthMiddleware, document_api_keys
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
    metrics = Metrics()
    limiter = make_limiter(
        settings.rate_limit_store,
        settings.rate_limit,
        settings.rate_limit_burst,
        on_store_error=metrics.rate_limit_store_errors.inc,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Metered: every job's cache outcome, compute time and error code reach /metrics.
        worker_pool = MeteredPool(pool if pool is not None else _worker_pool(settings), metrics)
        app.state.pool = worker_pool
        app.state.batcher = Batcher(worker_pool, settings.batch_window_ms / 1000.0, settings.batch_max)
        metrics.watch(worker_pool, app.state.batcher)
        if settings.nice:
            from service.workers import take_nice

            # On the loop's thread before the pool spawns anything: later threads and workers inherit it.
            take_nice(settings.nice)
        if settings.realtime_priority:
            from service.workers import take_realtime

            # The loop's thread only: threads and workers started later begin ordinary (reset on fork).
            take_realtime(settings.realtime_priority)
        await worker_pool.start()  # returns at once; /readyz turns 200 when a worker is warm
        try:
            yield
        finally:
            await worker_pool.close(settings.shutdown_grace_s)
            if limiter is not None:
                await limiter.aclose()

    app = FastAPI(
        title="tapeserve",
        version="0.1.0",
        summary="A REST gradient-computation service.",
        description=_DESCRIPTION,
        default_response_class=OrjsonResponse,
        lifespan=lifespan,
        redoc_url=None,
        docs_url=None,  # FastAPI's /docs loads Swagger UI from a CDN; routes/playground.py serves it locally
        # Off: metrics are Prometheus (/metrics), logs are ours; its OpenTelemetry check costs every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.umbridge_models = _umbridge_models(settings)
    install_problem_handlers(app)
    computing = endpoints.router(endpoints.ENDPOINTS)  # every computing POST of /v1, from the one table
    app.include_router(computing)
    for module in (functions, health, umbridge, playground):
        _summaries_from_docstrings(module.router.routes)
        app.include_router(module.router)
    playground.mount_static(app)
    _summaries_from_docstrings(metrics_router.routes)
    app.include_router(metrics_router)
    # Innermost: the hot endpoints skip FastAPI's per-request machinery; every middleware below still applies.
    app.add_middleware(
        FastPathMiddleware,
        state=app.state,
        endpoints=endpoints.fast_endpoints(endpoints.ENDPOINTS),
        routes=computing.routes,
    )
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    # Outside the body limit (a refused client's body is never read), inside the UM-Bridge errors.
    app.add_middleware(
        AuthMiddleware,
        digests=settings.api_key_digests(),
        metrics_public=settings.metrics_public,
        limiter=limiter,
    )
    # Outside the body limit, so its 413 under /umbridge also becomes the protocol's error body.
    app.add_middleware(umbridge.UMBridgeErrorsMiddleware)
    if settings.cors_origin_list():
        # Outside auth: preflights are answered here, and refusals carry CORS headers the page can read.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list(),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
            max_age=600,  # browsers re-check the policy every 10 minutes at most
        )
    if settings.refusal_rate > 0:
        # Outside all that refuses (auth, body limit, CORS, UM-Bridge errors): it sees each final status.
        app.add_middleware(
            RefusalBrake,
            rate=settings.refusal_rate,
            burst=settings.refusal_burst,
            on_delay=metrics.refusals_delayed.observe,
        )
    # Outermost: every response, including CORS and auth refusals, carries the request id.
    app.add_middleware(RequestContextMiddleware, observer=metrics.observe_response)
    _add_tensor_schemas(app)
    return app


def _summaries_from_docstrings(routes: Sequence[BaseRoute]) -> None:
    """Each route's one-line docstring is its OpenAPI summary (FastAPI would use the function name)."""
    for route in routes:
        if isinstance(route, APIRoute) and route.summary is None and route.endpoint.__doc__:
            route.summary = route.endpoint.__doc__.strip().splitlines()[0]


def _add_tensor_schemas(app: FastAPI) -> None:
    """Tensor fields refer to named schemas that pydantic does not generate; add them to the document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(TENSOR_COMPONENTS)
            document_problem_media_type(schema)
            document_api_keys(schema, metrics_public=app.state.settings.metrics_public)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
