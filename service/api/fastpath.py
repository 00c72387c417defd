"""A raw-ASGI fast path for the hot JSON endpoints: the same work without FastAPI's request machinery.

FastAPI's routing, dependency resolution, request and response objects cost about a millisecond
per request on a small machine: more than a warm gradient itself. For the few endpoints that carry
the service's traffic, this middleware (the innermost one, so authentication, body limits, request
ids, CORS and metrics still apply) parses the body with orjson, validates it with the endpoint's
pydantic model once, runs the endpoint's own coroutine and writes the JSON answer itself.

It only takes the happy path. A body it cannot parse or validate, or a request it does not
recognize, is handed (body replayed) to the FastAPI route, so every problem a client can cause is
answered by exactly the same code as before, with the same ``code``, message and field path.
Errors raised by the endpoint itself go through ``problem_response`` like everywhere else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.datastructures import State
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import wire
from service.api.offload import RequestWork, off_loop_if
from service.api.problems import as_tapeserve_error, problem_response

__all__ = ["FastEndpoint", "FastPathMiddleware"]

# The endpoint's work: (validated body, the application's state, body size in bytes) -> JSON content.
EndpointRun = Callable[[Any, State, int], Awaitable[Any]]

_JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclass(frozen=True)
class FastEndpoint:
    """One POST endpoint on the fast path: its body model and the coroutine the FastAPI route also calls."""

    model: type[BaseModel]
    run: EndpointRun
    # Which valid bodies the fast path answers (None: all); the others go to the route, e.g. streams.
    accepts: Callable[[Any], bool] | None = None


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            media: bytes = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False


class FastPathMiddleware:
    """Serves POSTs to ``endpoints`` directly; everything else goes on to the FastAPI app."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        state: State,
        endpoints: Mapping[str, FastEndpoint],
        routes: Sequence[BaseRoute],
    ) -> None:
        self.app = app
        self.state = state
        self.endpoints = dict(endpoints)
        # The matched route goes into the scope, as the router would put it: logs and metrics label by it.
        self.routes = {
            route.path: route
            for route in routes
            if isinstance(route, APIRoute)
            and route.path in self.endpoints
            and "POST" in (route.methods or ())
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        endpoint = self.endpoints.get(path)
        if endpoint is None or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        body, ended = await _read_body(receive)
        parsed = None
        if ended:  # a large body is parsed and validated in a thread (service/api/offload.py)
            costly = RequestWork(body_bytes=len(body)).costly
            parsed = await off_loop_if(costly, _validate, endpoint.model, body)
        if parsed is None or (endpoint.accepts is not None and not endpoint.accepts(parsed)):
            await self.app(scope, _replay(body, ended, receive), send)
            return
        scope["route"] = self.routes.get(path)
        try:
            content = await endpoint.run(parsed, self.state, len(body))
            payload = wire.dumps(content)
        except Exception as exc:  # every failure becomes a problem, as in TapeserveRoute
            response = problem_response(as_tapeserve_error(exc, path), path)
            await response(scope, receive, send)
            return
        headers = [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode("ascii"))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole body (BodyLimitMiddleware, outside, has bounded it), and whether it arrived whole."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False  # the client went away; the app sees the disconnect
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks), True


def _validate(model: type[BaseModel], body: bytes) -> BaseModel | None:
    try:
        return model.model_validate(orjson.loads(body))
    except (orjson.JSONDecodeError, ValidationError):
        return None  # the FastAPI route explains what is wrong


def _replay(body: bytes, ended: bool, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": not ended}
        return await receive()

    return replay
