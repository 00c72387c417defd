"""Request ids, the access log and the log format: a pure ASGI middleware and the logging set-up.

Every request gets an id: the client's ``X-Request-ID`` when it is a safe token (at most 128 of
``[A-Za-z0-9._-]``), else a fresh random 128-bit hex id. It is returned in ``X-Request-ID`` on every response,
put in every problem+json body (``request_id``) and in every log line written while the request runs.
One access line per request names the method, the route template, the status, the duration and the
request id; never the body, the query string, values, expressions or keys.

Pure ASGI rather than BaseHTTPMiddleware: that one runs the app in a separate task (breaking
streaming back-pressure and context variables) and costs measurable latency on the hot path.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import wire

__all__ = [
    "ACCESS_LOGGER",
    "JSONFormatter",
    "RequestContextMiddleware",
    "ResponseObserver",
    "configure_logging",
    "current_request_id",
    "route_template",
]

ACCESS_LOGGER = "tapeserve.access"
access_log = logging.getLogger(ACCESS_LOGGER)
_service_log = logging.getLogger("tapeserve")
# The JSON handler configure_logging installed (None: not configured, or plain text).
_json_handler: logging.StreamHandler[Any] | None = None

_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("tapeserve_request_id", default=None)
# 128: room for any tracing system's ids (W3C trace ids are 32 hex digits) without letting a client
# put a paragraph in every log line; the alphabet keeps ids safe in headers, logs and shells.
_VALID_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")
_HEADER = b"x-request-id"
# Requests that matched no route share one label, so scanners cannot grow the metrics or log fields.
UNMATCHED_ROUTE = "unmatched"

# (method, route template, status, duration in seconds) -> None; called once per response.
ResponseObserver = Callable[[str, str, int, float], None]


def current_request_id() -> str | None:
    """The id of the request being served in this context (None outside a request)."""
    return _REQUEST_ID.get()


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/v1/gradient``, ``/umbridge/Evaluate``), never the raw path."""
    route = scope.get("route")
    path: object = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == _HEADER:
            if _VALID_ID.fullmatch(value):
                return str(value.decode("ascii"))
            break
    return os.urandom(16).hex()  # a random 128-bit id, as uuid4().hex, without the UUID object


class RequestContextMiddleware:
    """Assigns the request id, returns it, writes the access line and reports to ``observer``."""

    def __init__(self, app: ASGIApp, *, observer: ResponseObserver | None = None) -> None:
        self.app = app
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        # Not reset afterwards: each request runs in its own task (context), and an error rendered by
        # Starlette's outermost handler after this frame has returned still finds the id.
        _REQUEST_ID.set(request_id)
        header = (_HEADER, request_id.encode("ascii"))
        status = 500  # if the app fails before it answers, Starlette's last-resort handler says 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - started
            route = route_template(scope)
            method: str = scope["method"]
            if self.observer is not None:
                self.observer(method, route, status, duration)
            if access_log.isEnabledFor(logging.INFO):
                _access_line(method, route, status, duration, scope.get("tapeserve.key_id"))


def _access_line(method: str, route: str, status: int, duration: float, key_id: str | None) -> None:
    """One access line: straight to the service's own JSON handler when that is where it would go."""
    milliseconds = duration * 1000.0
    duration_ms = round(milliseconds, 3)
    message = f"{method} {route} {status} {milliseconds:.1f} ms"
    handler = _direct_handler()
    if handler is not None:
        # What the handler would write for the record below, without the record: the logging
        # machinery (record, handler chain, formatter) is most of an access line's cost per request.
        fields = {"method": method, "route": route, "status": status, "duration_ms": duration_ms}
        if key_id is not None:
            fields["key_id"] = key_id
        line = _json_line(time.time(), "info", ACCESS_LOGGER, message, fields)
        try:
            with handler.lock:  # type: ignore[union-attr]  # set by Handler.__init__
                handler.stream.write(line + handler.terminator)
                handler.flush()
            return
        except Exception:
            pass  # a closed or broken stream: the handler reports it below, as it does for any line
    # Built directly: Logger.info would also walk the stack for the caller (findCaller), a third of
    # the cost of an access line, to report a location that never changes.
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 0, message, None, None)
    record.method = method
    record.route = route
    record.status = status
    record.duration_ms = duration_ms
    record.key_id = key_id
    access_log.handle(record)


def _direct_handler() -> logging.StreamHandler[Any] | None:
    """configure_logging's JSON handler, if an access record would reach it alone and unfiltered."""
    handler = _json_handler
    if (
        handler is None
        or _service_log.handlers != [handler]
        or handler.filters
        or handler.level > logging.INFO
    ):
        return None
    if access_log.handlers or access_log.filters or not access_log.propagate:
        return None
    return handler


# Record attributes the JSON formatter copies when a log call passes them in ``extra``.
_EXTRA_FIELDS = ("method", "route", "status", "duration_ms", "key_id")


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def _utc_time(created: float) -> str:
    """ISO 8601 UTC with milliseconds; strftime runs once per second, not once per line."""
    whole = int(created)
    if _second[0] != whole:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((created - whole) * 1000):03d}Z"


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id and the access fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {}
        for name in _EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                fields[name] = value
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return _json_line(record.created, record.levelname.lower(), record.name, record.getMessage(), fields)


def _json_line(created: float, level: str, logger: str, message: str, fields: dict[str, Any]) -> str:
    """A JSON log line: time, level, logger, message, the request's id (if any), then ``fields``."""
    entry: dict[str, Any] = {"time": _utc_time(created), "level": level, "logger": logger, "message": message}
    request_id = _REQUEST_ID.get()
    if request_id is not None:
        entry["request_id"] = request_id
    entry.update(fields)
    try:
        return orjson.dumps(entry).decode()  # str, int, finite float, None: nothing orjson refuses
    except TypeError:  # an extra field of another type: as the API writes anything
        return wire.dumps_safe(entry).decode()


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = _REQUEST_ID.get()
        return f"{line} [request_id={request_id}]" if request_id is not None else line


# The loggers the server writes to: ours, and uvicorn's start-up/error lines (its access log is
# replaced by ours, which knows the route template and the request id).
_LOGGERS = ("tapeserve", "uvicorn", "uvicorn.error")


def configure_logging(level: str, log_format: str) -> None:
    """Send the service's and uvicorn's log lines to stderr as JSON lines or plain text."""
    global _json_handler
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        formatter: logging.Formatter = JSONFormatter()
    else:
        formatter = _TextFormatter("%(levelname)s:     %(name)s: %(message)s")
    handler.setFormatter(formatter)
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    # Access lines may skip the logging machinery only while this handler is the one they reach.
    _json_handler = handler if log_format == "json" else None
