"""``Client`` and ``AsyncClient``: the tapeserve API over httpx, numpy arrays in and out.

Both are thin: each public method is its ``Endpoints`` method (signature, docstring and the ``Call``
it builds, ``_endpoints.py``) followed by the send, synchronous here or awaited there. Everything
else a call needs, its request, reading the answer, the exception an error answer means, the lines of
a stream, is in the sans-IO core (``_core.py``); what is left here is the I/O and the retry loop
around it (``Retry`` decides, ``_retry.py``).
"""

from __future__ import annotations

import asyncio
import inspect
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

import httpx

from service.client._core import (
    ClientCore,
    RunState,
    ndjson_item,
    raise_for_status,
    read_answer,
    transport_error,
)
from service.client._endpoints import Endpoints
from service.client._exceptions import TapeserveError
from service.client._models import TrainProgress, TrainResult
from service.client._requests import Call, TrainStream
from service.client._results import ConstantInfo, FunctionInfo, Functions, Readiness
from service.client._retry import Attempts, Retry
from service.client._wire import DEFAULT_BASE64_THRESHOLD, EncodingChoice

__all__ = [
    "AsyncClient",
    "AsyncTrainingRun",
    "Client",
    "ConstantInfo",
    "FunctionInfo",
    "Functions",
    "Readiness",
    "TrainingRun",
]

T = TypeVar("T")
P = ParamSpec("P")


class TrainingRun(RunState):
    """A streamed training run: iterating yields ``TrainProgress``; afterwards ``result`` is set."""

    def __init__(self, lines: Iterator[dict[str, Any]], dtype: str) -> None:
        super().__init__(dtype)
        self._lines = lines

    def __iter__(self) -> Iterator[TrainProgress]:
        for line in self._lines:
            progress = self._take(line)
            if progress is not None:
                yield progress
        self._finished()

    def wait(self) -> TrainResult:
        """Run to the end, ignoring progress, and return the result."""
        for _ in self:
            pass
        return self._finished()


class AsyncTrainingRun(RunState):
    """The asynchronous twin of ``TrainingRun``: ``async for progress in run``; then ``run.result``."""

    def __init__(self, lines: AsyncIterator[dict[str, Any]], dtype: str) -> None:
        super().__init__(dtype)
        self._lines = lines

    async def __aiter__(self) -> AsyncIterator[TrainProgress]:
        async for line in self._lines:
            progress = self._take(line)
            if progress is not None:
                yield progress
        self._finished()

    async def wait(self) -> TrainResult:
        async for _ in self:
            pass
        return self._finished()


# -- making the clients' methods from the Endpoints methods -------------------------------------------


def _face(method: Callable[..., Any], build: Callable[..., Any], owner: str, run: type | None = None) -> None:
    """Give ``method`` the name, docstring and signature of ``build``, with the result its caller gets:
    ``T`` for ``Call[T]`` (as written in ``build``), or the ``run`` class of a streamed run.

    So help(), inspect and editors show each method as written; type checkers follow the ParamSpec.
    """
    hints = typing.get_type_hints(build)
    if run is None:
        written = build.__annotations__["return"]  # "Call[dict[str, np.ndarray]]"
        if not (written.startswith("Call[") and written.endswith("]")):
            raise TypeError(f"Endpoints.{build.__name__} must return a Call[...], not {written}")
        shown, returns = written[len("Call[") : -1], typing.get_args(hints["return"])[0]
    else:
        shown, returns = run.__name__, run
    method.__name__ = build.__name__
    method.__qualname__ = f"{owner}.{build.__name__}"
    method.__doc__ = build.__doc__
    method.__signature__ = inspect.signature(build).replace(return_annotation=shown)  # type: ignore[attr-defined]
    method.__annotations__ = {**hints, "return": returns}


def _sync(build: Callable[Concatenate[Endpoints, P], Call[T]]) -> Callable[Concatenate[Client, P], T]:
    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._send(build(self._endpoints, *args, **kwargs))

    _face(method, build, "Client")
    return method


def _async(
    build: Callable[Concatenate[Endpoints, P], Call[T]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._send(build(self._endpoints, *args, **kwargs))

    _face(method, build, "AsyncClient")
    return method


def _sync_run(
    build: Callable[Concatenate[Endpoints, P], TrainStream],
) -> Callable[Concatenate[Client, P], TrainingRun]:
    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> TrainingRun:
        stream = build(self._endpoints, *args, **kwargs)
        return TrainingRun(self._stream(stream.call), stream.dtype)

    _face(method, build, "Client", TrainingRun)
    return method


def _async_run(
    build: Callable[Concatenate[Endpoints, P], TrainStream],
) -> Callable[Concatenate[AsyncClient, P], AsyncTrainingRun]:
    def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> AsyncTrainingRun:
        stream = build(self._endpoints, *args, **kwargs)
        return AsyncTrainingRun(self._stream(stream.call), stream.dtype)

    _face(method, build, "AsyncClient", AsyncTrainingRun)
    return method


# -- the clients --------------------------------------------------------------------------------------


class Client(ClientCore):
    """A synchronous tapeserve client: ``Client("http://127.0.0.1:8000").gradient("sum(x**2)", x=[1, 2])``.

    ``base_url`` and ``api_key`` default to ``TAPESERVE_URL`` and ``TAPESERVE_API_KEY``; the key is
    sent as ``Authorization: Bearer``. ``retry`` is a ``Retry`` or a number of retries; ``transport``
    is any httpx transport (``httpx.MockTransport``, ``httpx.WSGITransport``...); ``sleep`` waits
    between retries (tests pass a recorder). Tensors above ``base64_threshold`` elements travel as
    base64 both ways unless ``encoding`` forces one form. Variables are keyword arguments
    (``x=array``) or a ``variables`` dict (for names that clash with an option, such as ``dtype``).
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        retry: Retry | int | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        base64_threshold: int = DEFAULT_BASE64_THRESHOLD,
        encoding: EncodingChoice = "auto",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            timeout=timeout,
            retry=retry,
            headers=headers,
            base64_threshold=base64_threshold,
            encoding=encoding,
        )
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, call: Call[T]) -> T:
        request, attempts = self.request(call).arguments(), Attempts(self.retry)
        while True:
            try:
                try:
                    response = self._http.request(**request)
                except httpx.TransportError as error:
                    raise transport_error(error, self.base_url) from error
                return read_answer(call, response)
            except TapeserveError as error:
                wait = attempts.wait_after(error)
            self._sleep(wait)

    def _stream(self, call: Call[Any]) -> Iterator[dict[str, Any]]:
        """The NDJSON lines of a streamed answer; retried only until the first line arrives."""
        request, attempts = self.request(call).arguments(), Attempts(self.retry)
        while True:
            started = False
            try:
                try:
                    with self._http.stream(**request) as response:
                        if response.status_code not in call.accept:
                            response.read()
                            raise_for_status(response, call.accept)
                        for line in response.iter_lines():
                            item = ndjson_item(line)
                            if item is not None:
                                started = True
                                yield item
                        return
                except httpx.TransportError as error:
                    raise transport_error(error, self.base_url) from error
            except TapeserveError as error:
                if started:
                    raise
                wait = attempts.wait_after(error)
            self._sleep(wait)

    compute = _sync(Endpoints.compute)
    gradient = _sync(Endpoints.gradient)
    value_and_grad = _sync(Endpoints.value_and_grad)
    jacobian = _sync(Endpoints.jacobian)
    hessian = _sync(Endpoints.hessian)
    hvp = _sync(Endpoints.hvp)
    jvp = _sync(Endpoints.jvp)
    vjp = _sync(Endpoints.vjp)
    derivative = _sync(Endpoints.derivative)
    functions = _sync(Endpoints.functions)
    health = _sync(Endpoints.health)
    ready = _sync(Endpoints.ready)
    describe_model = _sync(Endpoints.describe_model)
    model_gradient = _sync(Endpoints.model_gradient)
    adversarial = _sync(Endpoints.adversarial)
    train_step = _sync(Endpoints.train_step)
    train = _sync_run(Endpoints.train)
    step = _sync(Endpoints.step)


class AsyncClient(ClientCore):
    """The asynchronous twin of ``Client`` (the same methods, awaited); ``sleep`` is awaited too."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        retry: Retry | int | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        base64_threshold: int = DEFAULT_BASE64_THRESHOLD,
        encoding: EncodingChoice = "auto",
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            timeout=timeout,
            retry=retry,
            headers=headers,
            base64_threshold=base64_threshold,
            encoding=encoding,
        )
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _send(self, call: Call[T]) -> T:
        request, attempts = self.request(call).arguments(), Attempts(self.retry)
        while True:
            try:
                try:
                    response = await self._http.request(**request)
                except httpx.TransportError as error:
                    raise transport_error(error, self.base_url) from error
                return read_answer(call, response)
            except TapeserveError as error:
                wait = attempts.wait_after(error)
            await self._sleep(wait)

    async def _stream(self, call: Call[Any]) -> AsyncIterator[dict[str, Any]]:
        """The NDJSON lines of a streamed answer; retried only until the first line arrives."""
        request, attempts = self.request(call).arguments(), Attempts(self.retry)
        while True:
            started = False
            try:
                try:
                    async with self._http.stream(**request) as response:
                        if response.status_code not in call.accept:
                            await response.aread()
                            raise_for_status(response, call.accept)
                        async for line in response.aiter_lines():
                            item = ndjson_item(line)
                            if item is not None:
                                started = True
                                yield item
                        return
                except httpx.TransportError as error:
                    raise transport_error(error, self.base_url) from error
            except TapeserveError as error:
                if started:
                    raise
                wait = attempts.wait_after(error)
            await self._sleep(wait)

    compute = _async(Endpoints.compute)
    gradient = _async(Endpoints.gradient)
    value_and_grad = _async(Endpoints.value_and_grad)
    jacobian = _async(Endpoints.jacobian)
    hessian = _async(Endpoints.hessian)
    hvp = _async(Endpoints.hvp)
    jvp = _async(Endpoints.jvp)
    vjp = _async(Endpoints.vjp)
    derivative = _async(Endpoints.derivative)
    functions = _async(Endpoints.functions)
    health = _async(Endpoints.health)
    ready = _async(Endpoints.ready)
    describe_model = _async(Endpoints.describe_model)
    model_gradient = _async(Endpoints.model_gradient)
    adversarial = _async(Endpoints.adversarial)
    train_step = _async(Endpoints.train_step)
    train = _async_run(Endpoints.train)
    step = _async(Endpoints.step)
