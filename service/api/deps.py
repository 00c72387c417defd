"""What route handlers receive: the settings, the worker pool, and the route class every router uses."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Protocol

import orjson
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from service.api import wire
from service.api.batching import Batcher
from service.api.offload import RequestWork, off_loop_if
from service.api.problems import UnsupportedMediaType, as_tapeserve_error
from service.api.settings import Settings
from service.errors import TapeserveError

__all__ = [
    "BatcherDep",
    "GradientPool",
    "JSONRequest",
    "OrjsonResponse",
    "PoolDep",
    "SettingsDep",
    "TapeserveRoute",
]

log = logging.getLogger("tapeserve.api")


class GradientPool(Protocol):
    """The part of service.workers.WorkerPool the API uses (tests substitute their own)."""

    @property
    def ready(self) -> bool: ...

    @property
    def idle_workers(self) -> int: ...

    async def start(self) -> None: ...

    async def run(self, job: Any, *, timeout_s: float | None = None, affinity: str | None = None) -> Any: ...

    async def close(self, grace_s: float | None = None) -> None: ...

    def status(self) -> dict[str, Any]: ...


class OrjsonResponse(JSONResponse):
    """JSON written by ``wire.dumps``: orjson with numpy buffers, non-finite numbers as strings."""

    def render(self, content: Any) -> bytes:
        return wire.dumps(content)


class JSONRequest(Request):
    """A request whose JSON body is parsed by orjson: fast, and strict RFC 8259 (no NaN literals)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            # orjson.JSONDecodeError is a json.JSONDecodeError; a large body is parsed in a thread.
            self._json = await off_loop_if(RequestWork(body_bytes=len(body)).costly, orjson.loads, body)
        return self._json


_JSON_TYPES = ("application/json",)


class TapeserveRoute(APIRoute):
    """Parses bodies with orjson, insists on JSON bodies, turns unexpected exceptions into a logged 500."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            if request.method in ("POST", "PUT", "PATCH"):
                content_type = request.headers.get("content-type")
                media = (content_type or "").split(";", 1)[0].strip().lower()
                if media not in _JSON_TYPES and not media.endswith("+json"):
                    sent = f"not {media!r}" if media else "and the Content-Type header is missing"
                    raise UnsupportedMediaType(f"the request body must be application/json, {sent}")
            try:
                return await handler(JSONRequest(request.scope, request.receive))
            except (TapeserveError, RequestValidationError, StarletteHTTPException):
                raise
            except Exception as error:
                raise as_tapeserve_error(error, request.url.path) from None

        return route_handler


# async: FastAPI would run plain functions in a thread pool, a thread hop per request for nothing.
async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_pool(request: Request) -> GradientPool:
    pool: GradientPool = request.app.state.pool
    return pool


async def get_batcher(request: Request) -> Batcher:
    batcher: Batcher = request.app.state.batcher
    return batcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
PoolDep = Annotated[GradientPool, Depends(get_pool)]
