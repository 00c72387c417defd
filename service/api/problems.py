"""Every failure becomes one application/problem+json body (RFC 9457), here and nowhere else.

Exceptions are first turned into a ``TapeserveError`` (``as_tapeserve_error``), then rendered by
``problem_response``; the FastAPI handlers and the body-size middleware both end there.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.api import wire
from service.api.logging import current_request_id
from service.errors import InvalidRequest, MalformedJSON, Overloaded, Quarantined, TapeserveError

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "MethodNotAllowed",
    "NotFound",
    "ProblemResponse",
    "UnsupportedMediaType",
    "as_tapeserve_error",
    "install_problem_handlers",
    "problem_response",
]

log = logging.getLogger("tapeserve.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
# Enough validation errors to fix a request in one go; a hostile body cannot make the reply huge.
_MAX_LISTED_ERRORS = 20


class NotFound(TapeserveError):
    code = "not_found"
    status = 404
    title = "Not found"


class MethodNotAllowed(TapeserveError):
    code = "method_not_allowed"
    status = 405
    title = "Method not allowed"


class UnsupportedMediaType(TapeserveError):
    code = "unsupported_media_type"
    status = 415
    title = "Unsupported media type"


class ProblemResponse(Response):
    media_type = PROBLEM_MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        return wire.dumps_safe(content)  # cannot fail, whatever the details hold


def problem_response(
    error: TapeserveError, instance: str, headers: Mapping[str, str] | None = None
) -> Response:
    """The one rendering of an error: its problem members, the request path as ``instance`` and its id."""
    body = error.to_dict()
    body["instance"] = instance
    request_id = current_request_id()
    if request_id is not None:
        body["request_id"] = request_id
    out = dict(headers or {})
    if isinstance(error, Overloaded | Quarantined):
        retry_after = getattr(error, "retry_after", None) or body.pop("retry_after", None) or 1
        out["Retry-After"] = str(max(1, math.ceil(float(retry_after))))
    return ProblemResponse(body, status_code=error.status, headers=out)


def _field_path(loc: Sequence[Any], body: Any = None) -> str:
    """pydantic's error location as a request path, e.g. ``model.layers[1].units``.

    Walking the body alongside drops the tags pydantic inserts for discriminated unions (the
    ``dense`` in ``layers[1].dense.units``): they name the union member, not a field.
    """
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    path, node = "", body
    for part in parts:
        if isinstance(node, dict) and isinstance(part, str) and part not in node and node.get("type") == part:
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        try:
            node = node[part] if isinstance(node, dict | list) else None
        except (KeyError, IndexError, TypeError):
            node = None
    return path or "body"


def _from_validation(exc: RequestValidationError) -> TapeserveError:
    errors = list(exc.errors())
    for err in errors:
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "invalid JSON")
            where = err.get("loc", ("body", None))
            position = where[1] if len(where) > 1 and isinstance(where[1], int) else None
            at = f" at character {position}" if position is not None else ""
            return MalformedJSON(f"the request body is not valid JSON: {reason}{at}", position=position)
    # Never echo `input`: it is user data and may be megabytes.
    listed = [
        {
            "field": _field_path(err.get("loc", ()), getattr(exc, "body", None)),
            "message": str(err.get("msg", "")),
            "type": err.get("type"),
        }
        for err in errors[:_MAX_LISTED_ERRORS]
    ]
    if not listed:
        return InvalidRequest("the request is invalid")
    detail = "; ".join(f"{item['field']}: {item['message']}" for item in listed[:5])
    if len(errors) > 5:
        detail += f"; and {len(errors) - 5} more"
    return InvalidRequest(detail, field=listed[0]["field"], errors=listed)


def as_tapeserve_error(exc: BaseException, path: str) -> TapeserveError:
    """Any exception as the TapeserveError it is reported as (unexpected ones are logged, then hidden)."""
    if isinstance(exc, TapeserveError):
        return exc
    if isinstance(exc, RequestValidationError):
        return _from_validation(exc)
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 404:
            return NotFound(f"no route {path}; see /docs for the API")
        if exc.status_code == 405:
            return MethodNotAllowed(f"{path} does not support this method")
        if 400 <= exc.status_code < 500:
            return (
                MalformedJSON(str(exc.detail)) if exc.status_code == 400 else InvalidRequest(str(exc.detail))
            )
    log.error("unhandled error on %s", path, exc_info=(type(exc), exc, exc.__traceback__))
    return TapeserveError("an internal error occurred; it has been logged")


async def _handle(request: Request, exc: Exception) -> Response:
    headers: dict[str, str] = {}
    if isinstance(exc, StarletteHTTPException) and exc.headers:
        headers.update({k: v for k, v in exc.headers.items() if k.lower() == "allow"})
    return problem_response(as_tapeserve_error(exc, request.url.path), request.url.path, headers)


def document_problem_media_type(openapi: dict[str, Any]) -> None:
    """Document error responses that use the Problem schema as application/problem+json, as they are sent."""
    ref = "#/components/schemas/Problem"
    for operations in openapi.get("paths", {}).values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                schema = content.get("application/json", {}).get("schema", {})
                if status[:1] in "45" and schema.get("$ref") == ref:
                    content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")


def install_problem_handlers(app: FastAPI) -> None:
    """Route every exception type through ``problem_response``."""
    for exc_type in (TapeserveError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, _handle)
