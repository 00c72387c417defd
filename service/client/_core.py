"""The sans-IO core both clients stand on: configuration, the request for a ``Call``, and the answer.

``ClientCore.request`` turns a ``Call`` into what httpx sends (method, path, headers, body bytes,
timeout); ``read_answer`` turns what came back into the call's result or an exception. An error
answer becomes an exception in ``raise_for_status`` only (by way of ``_exceptions.problem_exception``,
the one map of codes and statuses to classes), a transport failure in ``transport_error`` only, and a
line of a streamed answer is read by ``ndjson_item``. ``Client`` and ``AsyncClient`` add the I/O.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import httpx

from service.client._endpoints import Endpoints
from service.client._exceptions import (
    ConnectError,
    DecodingError,
    RequestTimeout,
    TransportError,
    raise_problem,
)
from service.client._models import TrainProgress, TrainResult, parse_train_line
from service.client._requests import Call
from service.client._retry import Retry
from service.client._wire import EncodingChoice, TensorCodec, dumps_body

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "ClientCore",
    "HTTPRequest",
    "RunState",
    "ndjson_item",
    "raise_for_status",
    "read_answer",
    "transport_error",
]

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:8000"
# The server's own default deadline is 30 s and a request may wait in its queue first: a client that
# gave up sooner would abandon answers that are on their way.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
# Extra read time beyond a request's own timeout_s, for queueing and the trip back.
_DEADLINE_SLACK_S = 5.0
_USER_AGENT = "tapeserve-client/0.1"


class HTTPRequest(NamedTuple):
    """What httpx sends for one call: the arguments of ``httpx.Client.request`` and ``.stream``."""

    method: str
    url: str
    content: bytes | None
    headers: dict[str, str] | None
    timeout: httpx.Timeout | None

    def arguments(self) -> dict[str, Any]:
        """Only what this request sets, so the httpx client's own defaults apply to the rest."""
        return {name: value for name, value in self._asdict().items() if value is not None}


class ClientCore:
    """Configuration and request preparation shared by Client and AsyncClient."""

    def __init__(
        self,
        base_url: str | None,
        *,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        retry: Retry | int | None,
        headers: Mapping[str, str] | None,
        base64_threshold: int,
        encoding: EncodingChoice,
    ) -> None:
        self.base_url = (base_url or os.environ.get("TAPESERVE_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("TAPESERVE_API_KEY")
        self.headers = {"User-Agent": _USER_AGENT, "Accept": "application/json", **(headers or {})}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.timeout = (
            timeout
            if isinstance(timeout, httpx.Timeout)
            else (DEFAULT_TIMEOUT if timeout is None else httpx.Timeout(timeout))
        )
        self.retry = retry if isinstance(retry, Retry) else Retry(attempts=3 if retry is None else retry)
        if encoding not in ("auto", "json", "base64"):
            raise ValueError(f"encoding must be 'auto', 'json' or 'base64', not {encoding!r}")
        self.codec = TensorCodec(threshold=base64_threshold, encoding=encoding)
        self._endpoints = Endpoints(self.codec)

    def request(self, call: Call[Any]) -> HTTPRequest:
        """The request for ``call``: strict JSON bytes, and a read timeout that outlasts its deadline."""
        if call.body is None:
            return HTTPRequest(call.method, call.path, None, None, None)
        timeout = None
        deadline = call.body.get("timeout_s")
        if isinstance(deadline, int | float):
            read = max(self.timeout.read or 0.0, float(deadline) + _DEADLINE_SLACK_S)
            timeout = httpx.Timeout(
                connect=self.timeout.connect, read=read, write=self.timeout.write, pool=self.timeout.pool
            )
        # allow_nan=False: the wire is strict JSON (non-finite values are already strings).
        content = dumps_body(call.body)
        return HTTPRequest(call.method, call.path, content, {"Content-Type": "application/json"}, timeout)


def transport_error(error: httpx.TransportError, url: str) -> TransportError:
    """An httpx failure as ours: no answer in time is RequestTimeout, anything else ConnectError."""
    if isinstance(error, httpx.TimeoutException) and not isinstance(error, httpx.ConnectTimeout):
        return RequestTimeout(f"no answer from {url} within the client's timeout ({type(error).__name__})")
    return ConnectError(f"cannot reach {url}: {error or type(error).__name__}")


def _decode_json(content: bytes, where: str) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        raise DecodingError(f"the answer of {where} is not JSON") from None


def raise_for_status(response: httpx.Response, accept: Sequence[int]) -> None:
    """The one place an error answer becomes an exception: by the problem's code, else the status."""
    if response.status_code in accept:
        return
    body: Any = None
    try:
        body = json.loads(response.content)
    except ValueError:
        text = response.content[:200].decode("utf-8", "replace").strip()
        body = {"detail": f"HTTP {response.status_code} {response.reason_phrase}: {text}".rstrip(": ")}
    raise_problem(response.status_code, body, response.headers.get("retry-after"))


def read_answer(call: Call[T], response: httpx.Response) -> T:
    """The result of ``call`` from its whole (read) response, or the exception the response means."""
    raise_for_status(response, call.accept)
    return call.parse(_decode_json(response.content, call.path))


def ndjson_item(line: str) -> dict[str, Any] | None:
    """One line of a streamed answer as a JSON object (None for a blank line).

    A problem line (an error after the stream began) is raised.
    """
    if not line.strip():
        return None
    item = _decode_json(line.encode(), "the stream")
    if not isinstance(item, dict):
        raise DecodingError("a line of the stream is not a JSON object")
    if item.get("type") == "error":  # {"type": "error", "problem": {...}}
        problem = item.get("problem")
        problem = problem if isinstance(problem, dict) else item
        status = problem.get("status")
        raise_problem(status if isinstance(status, int) else 500, problem)
    return item


class RunState:
    """What a streamed training run has read so far: progress lines pass through, the last is kept."""

    def __init__(self, dtype: str) -> None:
        self._dtype = dtype
        self.result: TrainResult | None = None

    def _take(self, line: dict[str, Any]) -> TrainProgress | None:
        """The progress a line reports, or None when it is the result (kept in ``result``)."""
        item = parse_train_line(line, self._dtype)
        if isinstance(item, TrainResult):
            self.result = item
            return None
        return item

    def _finished(self) -> TrainResult:
        if self.result is None:
            raise DecodingError("the stream ended without a result")
        return self.result
