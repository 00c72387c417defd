"""The client's exceptions: one class per problem ``code``, chosen in one place (``problem_exception``).

Every failure a client call can end in is one of these::

    TapeserveError                    base of everything the client raises
    ├── TransportError                the request did not get an answer (after retries)
    │   ├── ConnectError              the server could not be reached
    │   └── RequestTimeout            no answer within the client's timeout
    ├── DecodingError                 the answer is not what the API sends (not JSON, wrong shape)
    └── APIError                      the API answered with a problem+json body (.status, .code, .problem)
        ├── InvalidRequest            422/400 invalid_request (.field, .errors)
        │   ├── ParseError            400 parse_error (.line, .column, .snippet, .source)
        │   ├── UnknownName           400 unknown_name (.suggestions)
        │   ├── UnsupportedOperation  400 unsupported_operation
        │   ├── InvalidArgument       400 invalid_argument
        │   ├── ShapeError            422 shape_error
        │   ├── DTypeError            422 dtype_error
        │   ├── NotDifferentiable     422 not_differentiable
        │   └── EvaluationError       422 evaluation_error
        ├── LimitExceeded             422 limit_exceeded (.limit, .allowed, .requested)
        │   └── PayloadTooLarge       413 payload_too_large
        ├── MemoryLimitExceeded       422 memory_limit (the job needed more than a worker may use)
        ├── Quarantined               422 quarantined (.retry_after; not retried)
        ├── Unauthorized              401 (a missing or wrong API key)
        ├── Forbidden                 403
        ├── NotFound                  404 not_found
        ├── MethodNotAllowed          405 method_not_allowed
        ├── UnsupportedMediaType      415 unsupported_media_type
        ├── RateLimited               429 (.retry_after; retried)
        ├── ServerError               500 internal_error, and any other 5xx
        ├── Timeout                   504 timeout (the computation passed its deadline; not retried)
        ├── WorkerCrashed             503 worker_crashed (retried)
        └── Overloaded                503 overloaded (.retry_after; retried)

The tree mirrors the server's ``service.errors``, but is the client's own: a server error type never
reaches a user (the wire codec's errors become ``DecodingError`` in ``_wire``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, NoReturn

__all__ = [
    "APIError",
    "ConnectError",
    "DTypeError",
    "DecodingError",
    "EvaluationError",
    "Forbidden",
    "InvalidArgument",
    "InvalidRequest",
    "LimitExceeded",
    "MethodNotAllowed",
    "NotDifferentiable",
    "NotFound",
    "MemoryLimitExceeded",
    "Overloaded",
    "Quarantined",
    "ParseError",
    "PayloadTooLarge",
    "RateLimited",
    "RequestTimeout",
    "ServerError",
    "ShapeError",
    "TapeserveError",
    "Timeout",
    "TransportError",
    "Unauthorized",
    "UnknownName",
    "UnsupportedMediaType",
    "UnsupportedOperation",
    "WorkerCrashed",
    "problem_exception",
    "raise_problem",
]


class TapeserveError(Exception):
    """Base of every exception the tapeserve client raises."""


class TransportError(TapeserveError):
    """The request got no answer from the server (raised after the retries are spent)."""


class ConnectError(TransportError):
    """The server could not be reached (refused, reset, DNS, TLS)."""


class RequestTimeout(TransportError):
    """The server did not answer within the client's timeout."""


class DecodingError(TapeserveError):
    """The server's answer is not what the tapeserve API sends."""


class APIError(TapeserveError):
    """The API answered with an error: an RFC 9457 problem with a stable ``code``.

    ``problem`` is the whole body (extension members such as ``field`` or ``limit`` included).
    """

    code: ClassVar[str] = ""  # the problem code this class stands for ("" for status-only classes)

    def __init__(self, problem: Mapping[str, Any], status: int) -> None:
        self.problem: dict[str, Any] = dict(problem)
        self.status = status
        self.code_value: str = str(problem.get("code") or type(self).code or f"http_{status}")
        self.detail: str = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
        self.field: str | None = _opt_str(problem.get("field"))
        super().__init__(self.detail)

    def __str__(self) -> str:
        return f"{self.code_value}: {self.detail}"


class InvalidRequest(APIError):
    code = "invalid_request"

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Every schema violation (field, message, type) when the server listed them."""
        listed = self.problem.get("errors")
        return [e for e in listed if isinstance(e, dict)] if isinstance(listed, list) else []


class _LocatedError(InvalidRequest):
    """An error in a piece of the request's text: where it is and a caret snippet under it."""

    @property
    def source(self) -> str | None:
        """Which text: "expression", "functions.f.body", ..."""
        return _opt_str(self.problem.get("source"))

    @property
    def line(self) -> int | None:
        return _opt_int(self.problem.get("line"))

    @property
    def column(self) -> int | None:
        return _opt_int(self.problem.get("column"))

    @property
    def snippet(self) -> str | None:
        """The offending line with a caret run under the offending part."""
        return _opt_str(self.problem.get("snippet"))

    def __str__(self) -> str:
        snippet = self.snippet
        return super().__str__() + (f"\n{snippet}" if snippet else "")


class ParseError(_LocatedError):
    code = "parse_error"


class UnknownName(_LocatedError):
    code = "unknown_name"

    @property
    def suggestions(self) -> list[str]:
        found = self.problem.get("suggestions")
        return [str(s) for s in found] if isinstance(found, list) else []


class UnsupportedOperation(_LocatedError):
    code = "unsupported_operation"


class InvalidArgument(_LocatedError):
    code = "invalid_argument"


class ShapeError(_LocatedError):
    code = "shape_error"


class DTypeError(_LocatedError):
    code = "dtype_error"


class NotDifferentiable(_LocatedError):
    code = "not_differentiable"


class EvaluationError(_LocatedError):
    code = "evaluation_error"


class LimitExceeded(APIError):
    code = "limit_exceeded"

    @property
    def limit(self) -> str | None:
        """The setting's name, e.g. "max_input_elements"."""
        return _opt_str(self.problem.get("limit"))

    @property
    def allowed(self) -> float | None:
        value = self.problem.get("allowed")
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None

    @property
    def requested(self) -> float | None:
        value = self.problem.get("requested")
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None


class PayloadTooLarge(LimitExceeded):
    code = "payload_too_large"


class Unauthorized(APIError):
    code = "unauthorized"


class Forbidden(APIError):
    code = "forbidden"


class NotFound(APIError):
    code = "not_found"


class MethodNotAllowed(APIError):
    code = "method_not_allowed"


class UnsupportedMediaType(APIError):
    code = "unsupported_media_type"


class _RetryAfterError(APIError):
    """An answer that says when to come back (the Retry-After header, in seconds)."""

    def __init__(self, problem: Mapping[str, Any], status: int, retry_after: float | None = None) -> None:
        super().__init__(problem, status)
        self.retry_after = retry_after


class RateLimited(_RetryAfterError):
    code = "rate_limited"


class ServerError(APIError):
    code = "internal_error"


class Timeout(APIError):
    code = "timeout"


class WorkerCrashed(APIError):
    code = "worker_crashed"


class Overloaded(_RetryAfterError):
    code = "overloaded"


class MemoryLimitExceeded(APIError):
    code = "memory_limit"


class Quarantined(_RetryAfterError):
    code = "quarantined"


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _concrete(cls: type[APIError]) -> list[type[APIError]]:
    out = [cls] if cls.code and not cls.__name__.startswith("_") else []
    for sub in cls.__subclasses__():
        out.extend(_concrete(sub))
    return out


_BY_CODE: dict[str, type[APIError]] = {cls.code: cls for cls in _concrete(APIError)}
# When the body has no (or an unknown) code, e.g. a proxy's error page: the status decides.
_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidRequest,
    429: RateLimited,
    504: Timeout,
}


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the delta-seconds form; an HTTP date is treated as absent)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def problem_exception(status: int, body: Any, retry_after: str | None = None) -> APIError:
    """The exception for an error answer: by the problem's ``code``, else by HTTP status."""
    problem: dict[str, Any] = dict(body) if isinstance(body, Mapping) else {}
    code = problem.get("code")
    cls = _BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None:
        cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    if issubclass(cls, _RetryAfterError):
        seconds = parse_retry_after(retry_after)
        if seconds is None and isinstance(problem.get("retry_after"), int | float):
            seconds = float(problem["retry_after"])
        return cls(problem, status, seconds)
    return cls(problem, status)


def raise_problem(status: int, body: Any, retry_after: str | None = None) -> NoReturn:
    """The one place an error answer is raised (whole responses and error lines of a stream)."""
    raise problem_exception(status, body, retry_after)
