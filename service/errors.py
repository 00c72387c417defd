"""The errors a user can cause, each with a stable machine-readable code, shared by every layer.

Every failure the service reports is one of these and becomes one application/problem+json body
(RFC 9457) in exactly one place, the API's error handler::

    TapeserveError                      500 internal_error (a real server fault; never a traceback)
    ├── InvalidRequest                  422 invalid_request (well-formed JSON, wrong content)
    │   ├── MalformedJSON               400 invalid_request (the body is not JSON)
    │   ├── ParseError                  400 parse_error (line, column, caret snippet)
    │   ├── UnknownName                 400 unknown_name (line, column, snippet, suggestions)
    │   ├── UnsupportedOperation        400 unsupported_operation
    │   ├── InvalidArgument             400 invalid_argument (a function argument of the wrong kind)
    │   ├── ShapeError                  422 shape_error
    │   ├── DTypeError                  422 dtype_error
    │   ├── NotDifferentiable           422 not_differentiable
    │   └── EvaluationError             422 evaluation_error (valid program, values it cannot take)
    ├── LimitExceeded                   422 limit_exceeded (which limit, its value, what was asked)
    │   └── PayloadTooLarge             413 payload_too_large
    ├── MemoryLimitExceeded             422 memory_limit (the job needed more than a worker's ceiling)
    ├── Quarantined                     422 quarantined (this program crashed a worker; until when)
    ├── Timeout                         504 timeout
    ├── WorkerCrashed                   503 worker_crashed
    └── Overloaded                      503 overloaded (with Retry-After)

The classes carry plain data (no FastAPI, no TensorFlow) so worker processes can raise them and
send them back as dictionaries (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "DTypeError",
    "EvaluationError",
    "InvalidArgument",
    "InvalidRequest",
    "LimitExceeded",
    "MalformedJSON",
    "MemoryLimitExceeded",
    "NotDifferentiable",
    "Overloaded",
    "ParseError",
    "PayloadTooLarge",
    "Quarantined",
    "ShapeError",
    "SourceLocation",
    "TapeserveError",
    "Timeout",
    "UnknownName",
    "UnsupportedOperation",
    "WorkerCrashed",
    "caret_snippet",
]


class TapeserveError(Exception):
    """Base of every error the service reports; ``extra`` members go into the problem body."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal server error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = {k: v for k, v in extra.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        """The problem members this error contributes (without request-specific ones)."""
        return {
            "type": f"urn:tapeserve:problem:{self.code}",
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
            **self.extra,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> TapeserveError:
        """Rebuild an error sent across a process boundary as ``to_dict()``."""
        cls = _BY_CODE_STATUS.get((data.get("code", ""), data.get("status", 500)), TapeserveError)
        extra = {k: v for k, v in data.items() if k not in {"type", "title", "status", "code", "detail"}}
        return cls(str(data.get("detail", "")), **extra)

    def __reduce__(self) -> tuple[Any, ...]:
        return (TapeserveError.from_dict, (self.to_dict(),))


class InvalidRequest(TapeserveError):
    code = "invalid_request"
    status = 422
    title = "Invalid request"


class MalformedJSON(InvalidRequest):
    status = 400
    title = "Malformed request body"


class SourceLocation:
    """Where in which piece of user text something went wrong (1-based line and column)."""

    __slots__ = ("column", "end_column", "line", "source")

    def __init__(self, source: str, line: int, column: int, end_column: int | None = None) -> None:
        self.source = source
        self.line = line
        self.column = column
        self.end_column = end_column


def caret_snippet(text: str, line: int, column: int, width: int = 1) -> str:
    """The offending line with a caret run under the offending part (as lark's get_context)."""
    lines = text.splitlines() or [""]
    row = lines[min(max(line, 1), len(lines)) - 1]
    # Keep snippets short for long one-line expressions: a window around the column.
    start = max(0, column - 1 - 40)
    shown = row[start : start + 80]
    prefix = "..." if start > 0 else ""
    suffix = "..." if start + 80 < len(row) else ""
    pad = len(prefix) + (column - 1 - start)
    return f"{prefix}{shown}{suffix}\n{' ' * pad}{'^' * max(1, min(width, 80))}"


class _LocatedError(InvalidRequest):
    """An error in user text: carries ``source``, ``line``, ``column`` and a caret ``snippet``."""

    def __init__(
        self,
        detail: str,
        *,
        text: str | None = None,
        where: SourceLocation | None = None,
        **extra: Any,
    ) -> None:
        if where is not None:
            extra.setdefault("source", where.source)
            extra.setdefault("line", where.line)
            extra.setdefault("column", where.column)
            if text is not None:
                width = 1 if where.end_column is None else max(1, where.end_column - where.column)
                extra.setdefault("snippet", caret_snippet(text, where.line, where.column, width))
            detail = f"{detail} (in {where.source}, line {where.line}, column {where.column})"
        super().__init__(detail, **extra)


class ParseError(_LocatedError):
    code = "parse_error"
    status = 400
    title = "Expression could not be parsed"


class UnknownName(_LocatedError):
    code = "unknown_name"
    status = 400
    title = "Unknown name"


class UnsupportedOperation(_LocatedError):
    code = "unsupported_operation"
    status = 400
    title = "Unsupported operation"


class InvalidArgument(_LocatedError):
    code = "invalid_argument"
    status = 400
    title = "Invalid function argument"


class ShapeError(_LocatedError):
    code = "shape_error"
    status = 422
    title = "Incompatible shapes"


class DTypeError(_LocatedError):
    code = "dtype_error"
    status = 422
    title = "Unsupported data type"


class NotDifferentiable(_LocatedError):
    code = "not_differentiable"
    status = 422
    title = "Not differentiable"


class EvaluationError(_LocatedError):
    """The program is valid but these values make it fail (e.g. cholesky of a non-PD matrix)."""

    code = "evaluation_error"
    status = 422
    title = "Evaluation failed"


class LimitExceeded(_LocatedError):
    code = "limit_exceeded"
    status = 422
    title = "Limit exceeded"

    def __init__(self, detail: str, *, limit: str, allowed: int | float, **extra: Any) -> None:
        super().__init__(detail, limit=limit, allowed=allowed, **extra)


class PayloadTooLarge(LimitExceeded):
    code = "payload_too_large"
    status = 413
    title = "Payload too large"


class MemoryLimitExceeded(TapeserveError):
    code = "memory_limit"
    status = 422
    title = "Memory limit exceeded"


class Quarantined(TapeserveError):
    """A program that crashed a worker, overran the kill budget or crossed the memory ceiling is
    refused at once for a while, instead of taking down one worker per retry."""

    code = "quarantined"
    status = 422
    title = "Program quarantined"

    def __init__(self, detail: str, *, retry_after: float = 1.0, **extra: Any) -> None:
        super().__init__(detail, retry_after=retry_after, **extra)
        self.retry_after = retry_after  # seconds until the quarantine ends; the Retry-After header


class Timeout(TapeserveError):
    code = "timeout"
    status = 504
    title = "Computation timed out"


class WorkerCrashed(TapeserveError):
    code = "worker_crashed"
    status = 503
    title = "Worker crashed"


class Overloaded(TapeserveError):
    code = "overloaded"
    status = 503
    title = "Service overloaded"

    def __init__(self, detail: str, *, retry_after: float = 1.0, **extra: Any) -> None:
        super().__init__(detail, retry_after=retry_after, **extra)
        self.retry_after = retry_after  # seconds; becomes the Retry-After header


def _all_subclasses(cls: type[TapeserveError]) -> list[type[TapeserveError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


_BY_CODE_STATUS: dict[tuple[str, int], type[TapeserveError]] = {}
for _cls in _all_subclasses(TapeserveError):
    if not _cls.__name__.startswith("_"):
        _BY_CODE_STATUS.setdefault((_cls.code, _cls.status), _cls)
