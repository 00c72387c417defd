"""``Client`` and ``AsyncClient``: the tapeserve API over httpx, numpy arrays in and out.

Both build the same ``Call`` objects (``_wire``) and differ only in how they wait; every error answer
becomes an exception in one place (``_raise_for_status``), every transport failure in another
(``_transport_error``), and the retry loop lives next to each send.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import httpx
import numpy as np
from numpy.typing import ArrayLike

from service.client._builder import Expr
from service.client._exceptions import (
    ConnectError,
    DecodingError,
    RequestTimeout,
    TapeserveError,
    TransportError,
    WorkerCrashed,
    raise_problem,
)
from service.client._models import (
    ModelDescription,
    ModelGradient,
    StepResult,
    TrainProgress,
    TrainResult,
    describe_call,
    model_gradient_call,
    parse_train_line,
    step_call,
    train_call,
)
from service.client._retry import Retry
from service.client._wire import (
    DEFAULT_BASE64_THRESHOLD,
    Call,
    Derivatives,
    EncodingChoice,
    TensorCodec,
    dumps_body,
    gradient_call,
    merge_variables,
)

__all__ = [
    "DEFAULT_URL",
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
DEFAULT_URL = "http://127.0.0.1:8000"
# The server's own default deadline is 30 s and a request may wait in its queue first: a client that
# gave up sooner would abandon answers that are on their way.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
# Extra read time beyond a request's own timeout_s, for queueing and the trip back.
_DEADLINE_SLACK_S = 5.0
_USER_AGENT = "tapeserve-client/0.1"
_JSON_TYPES = ("application/json", "application/problem+json", "application/x-ndjson")


# -- results that are not derivatives ----------------------------------------------------------------


@dataclass(frozen=True)
class FunctionInfo:
    name: str
    signature: str
    category: str
    doc: str


@dataclass(frozen=True)
class ConstantInfo:
    name: str
    value: float


@dataclass(frozen=True)
class Functions:
    """The expression language's reference (``GET /v1/functions``)."""

    functions: list[FunctionInfo]
    constants: list[ConstantInfo]
    syntax: list[str]

    @classmethod
    def from_json(cls, payload: Any) -> Functions:
        try:
            return cls(
                functions=[
                    FunctionInfo(str(f["name"]), str(f["signature"]), str(f["category"]), str(f["doc"]))
                    for f in payload["functions"]
                ],
                constants=[
                    ConstantInfo(str(c["name"]), float(c["value"])) for c in payload["constants"]
                ],  # float("Infinity") is inf
                syntax=[str(line) for line in payload["syntax"]],
            )
        except (KeyError, TypeError, ValueError):
            raise DecodingError("the functions response is malformed") from None


@dataclass(frozen=True)
class Readiness:
    """``GET /readyz``: whether a worker is warm, and the pool's status."""

    ready: bool
    status: str
    pool: dict[str, Any]

    @classmethod
    def from_json(cls, payload: Any) -> Readiness:
        if not isinstance(payload, Mapping) or not isinstance(payload.get("status"), str):
            raise DecodingError("the readiness response is malformed")
        pool = payload.get("pool")
        return cls(
            payload["status"] == "ready", payload["status"], dict(pool) if isinstance(pool, Mapping) else {}
        )


def _liveness(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, Mapping):
        raise DecodingError("the liveness response is malformed")
    return dict(payload)


# -- the parts both clients share -------------------------------------------------------------------


def _transport_error(error: httpx.TransportError, url: str) -> TransportError:
    """An httpx failure as ours: no answer in time is RequestTimeout, anything else ConnectError."""
    if isinstance(error, httpx.TimeoutException) and not isinstance(error, httpx.ConnectTimeout):
        return RequestTimeout(f"no answer from {url} within the client's timeout ({type(error).__name__})")
    return ConnectError(f"cannot reach {url}: {error or type(error).__name__}")


def _decode_json(content: bytes, where: str) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        raise DecodingError(f"the answer of {where} is not JSON") from None


def _raise_for_status(response: httpx.Response, accept: Sequence[int]) -> None:
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


class _Base:
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

    def _request_args(self, call: Call[Any]) -> dict[str, Any]:
        args: dict[str, Any] = {"method": call.method, "url": call.path}
        if call.body is not None:
            # allow_nan=False: the wire is strict JSON (non-finite values are already strings).
            args["content"] = dumps_body(call.body)
            args["headers"] = {"Content-Type": "application/json"}
            deadline = call.body.get("timeout_s")
            if isinstance(deadline, int | float):
                read = max(self.timeout.read or 0.0, float(deadline) + _DEADLINE_SLACK_S)
                args["timeout"] = httpx.Timeout(
                    connect=self.timeout.connect, read=read, write=self.timeout.write, pool=self.timeout.pool
                )
        return args

    # -- calls: one builder per endpoint, used by both clients --------------------------------------

    def _gradient_call(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None,
        keywords: Mapping[str, ArrayLike],
        derivatives: Sequence[str],
        parse: Callable[[Derivatives], T],
        **options: Any,
    ) -> Call[T]:
        return gradient_call(
            expression,
            merge_variables(variables, keywords),
            codec=self.codec,
            derivatives=derivatives,
            parse=parse,
            **options,
        )


def _options(
    constants: Mapping[str, ArrayLike] | None,
    functions: Mapping[str, Any] | None,
    wrt: Iterable[str] | str | None,
    batch: bool,
    dtype: str | None,
    timeout_s: float | None,
) -> dict[str, Any]:
    return {
        "constants": constants,
        "functions": functions,
        "wrt": wrt,
        "batch": batch,
        "dtype": dtype,
        "timeout_s": timeout_s,
    }


def _pick_gradient(result: Derivatives) -> dict[str, np.ndarray]:
    return result.gradient or {}


def _pick_value_and_grad(result: Derivatives) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    return result.value, result.gradient or {}


def _pick_jacobian(result: Derivatives) -> dict[str, np.ndarray]:
    return result.jacobian or {}


def _pick_hessian(result: Derivatives) -> dict[str, dict[str, np.ndarray]]:
    return result.hessian or {}


def _pick_hvp(result: Derivatives) -> dict[str, np.ndarray]:
    return result.hvp or {}


def _pick_jvp(result: Derivatives) -> np.ndarray:
    if result.jvp is None:
        raise DecodingError("the response has no jvp")
    return result.jvp


def _pick_vjp(result: Derivatives) -> dict[str, np.ndarray]:
    return result.vjp or {}


def _pick_derivatives(result: Derivatives) -> list[np.ndarray]:
    if result.derivatives is None:
        raise DecodingError("the response has no derivative")
    return result.derivatives


def _same(result: Derivatives) -> Derivatives:
    return result


class TrainingRun:
    """A streamed training run: iterating yields ``TrainProgress``; afterwards ``result`` is set."""

    def __init__(self, lines: Iterator[dict[str, Any]], dtype: str) -> None:
        self._lines = lines
        self._dtype = dtype
        self.result: TrainResult | None = None

    def __iter__(self) -> Iterator[TrainProgress]:
        for line in self._lines:
            item = parse_train_line(line, self._dtype)
            if isinstance(item, TrainResult):
                self.result = item
            else:
                yield item
        if self.result is None:
            raise DecodingError("the stream ended without a result")

    def wait(self) -> TrainResult:
        """Run to the end, ignoring progress, and return the result."""
        for _ in self:
            pass
        assert self.result is not None  # __iter__ raises otherwise
        return self.result


class AsyncTrainingRun:
    """The asynchronous twin of ``TrainingRun``: ``async for progress in run``; then ``run.result``."""

    def __init__(self, lines: AsyncIterator[dict[str, Any]], dtype: str) -> None:
        self._lines = lines
        self._dtype = dtype
        self.result: TrainResult | None = None

    async def __aiter__(self) -> AsyncIterator[TrainProgress]:
        async for line in self._lines:
            item = parse_train_line(line, self._dtype)
            if isinstance(item, TrainResult):
                self.result = item
            else:
                yield item
        if self.result is None:
            raise DecodingError("the stream ended without a result")

    async def wait(self) -> TrainResult:
        async for _ in self:
            pass
        assert self.result is not None
        return self.result


def _ndjson_lines(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """JSON objects, one a line; a problem line (an error after the stream began) is raised."""
    for line in lines:
        if line.strip():
            item = _decode_json(line.encode(), "the stream")
            if not isinstance(item, dict):
                raise DecodingError("a line of the stream is not a JSON object")
            if item.get("type") == "error":  # {"type": "error", "problem": {...}}
                problem = item.get("problem")
                problem = problem if isinstance(problem, dict) else item
                status = problem.get("status")
                raise_problem(status if isinstance(status, int) else 500, problem)
            yield item


# -- the clients --------------------------------------------------------------------------------------


class Client(_Base):
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
        retry = crashes = 0
        while True:
            try:
                try:
                    response = self._http.request(**self._request_args(call))
                except httpx.TransportError as error:
                    raise _transport_error(error, self.base_url) from error
                _raise_for_status(response, call.accept)
                return call.parse(_decode_json(response.content, call.path))
            except TapeserveError as error:
                delay = self.retry.delay(retry, error, crashes)
                if delay is None:
                    raise
                crashes += isinstance(error, WorkerCrashed)
            self._sleep(delay)
            retry += 1

    def _stream(self, call: Call[Any]) -> Iterator[dict[str, Any]]:
        """The NDJSON lines of a streamed answer; retried only until the first line arrives."""
        retry = crashes = 0
        while True:
            started = False
            try:
                try:
                    with self._http.stream(**self._request_args(call)) as response:
                        if response.status_code not in call.accept:
                            response.read()
                            _raise_for_status(response, call.accept)
                        for item in _ndjson_lines(response.iter_lines()):
                            started = True
                            yield item
                        return
                except httpx.TransportError as error:
                    raise _transport_error(error, self.base_url) from error
            except TapeserveError as error:
                delay = None if started else self.retry.delay(retry, error, crashes)
                if delay is None:
                    raise
                crashes += isinstance(error, WorkerCrashed)
            self._sleep(delay)
            retry += 1

    # -- POST /v1/gradient ----------------------------------------------------------------------------

    def compute(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        derivatives: Sequence[str] = ("gradient",),
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        tangents: Mapping[str, ArrayLike] | None = None,
        cotangent: ArrayLike | None = None,
        order: int | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> Derivatives:
        """Everything ``POST /v1/gradient`` can return in one call: the value and ``derivatives``."""
        return self._send(
            self._gradient_call(
                expression,
                variables,
                kw_variables,
                derivatives,
                _same,
                tangents=tangents,
                cotangent=cotangent,
                order=order,
                **_options(constants, functions, wrt, batch, dtype, timeout_s),
            )
        )

    def gradient(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> dict[str, np.ndarray]:
        """The gradient of the sum of the expression, per variable: ``gradient("sum(x**2)", x=[1, 2])``."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        call = self._gradient_call(
            expression, variables, kw_variables, ["gradient"], _pick_gradient, **options
        )
        return self._send(call)

    def value_and_grad(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The value and the gradient (per variable) from one evaluation."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        call = self._gradient_call(
            expression, variables, kw_variables, ["gradient"], _pick_value_and_grad, **options
        )
        return self._send(call)

    def jacobian(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> dict[str, np.ndarray]:
        """Per variable, the Jacobian of shape ``value.shape + var.shape``."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        call = self._gradient_call(
            expression, variables, kw_variables, ["jacobian"], _pick_jacobian, **options
        )
        return self._send(call)

    def hessian(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> dict[str, dict[str, np.ndarray]]:
        """The Hessian blocks of a scalar expression: ``result[a][b]`` has shape ``a.shape + b.shape``."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        call = self._gradient_call(expression, variables, kw_variables, ["hessian"], _pick_hessian, **options)
        return self._send(call)

    def hvp(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        tangents: Mapping[str, ArrayLike],
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> dict[str, np.ndarray]:
        """The Hessian-vector product with ``tangents`` (one per wrt variable), per variable."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        call = self._gradient_call(
            expression, variables, kw_variables, ["hvp"], _pick_hvp, tangents=tangents, **options
        )
        return self._send(call)

    def jvp(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        tangents: Mapping[str, ArrayLike],
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> np.ndarray:
        """The Jacobian-vector product with ``tangents``: an array of the value's shape."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        call = self._gradient_call(
            expression, variables, kw_variables, ["jvp"], _pick_jvp, tangents=tangents, **options
        )
        return self._send(call)

    def vjp(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        cotangent: ArrayLike,
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> dict[str, np.ndarray]:
        """The vector-Jacobian product with ``cotangent`` (of the value's shape), per variable."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        call = self._gradient_call(
            expression, variables, kw_variables, ["vjp"], _pick_vjp, cotangent=cotangent, **options
        )
        return self._send(call)

    def derivative(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        order: int,
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> list[np.ndarray]:
        """The 1st..``order``-th derivatives of a scalar expression w.r.t. its one (wrt) variable."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        call = self._gradient_call(
            expression, variables, kw_variables, [], _pick_derivatives, order=order, **options
        )
        return self._send(call)

    # -- the language and health ----------------------------------------------------------------------

    def functions(self) -> Functions:
        """The built-in functions, constants and syntax of the expression language."""
        return self._send(Call("GET", "/v1/functions", None, Functions.from_json))

    def health(self) -> dict[str, Any]:
        """Liveness (``GET /healthz``): ``{"status": "ok"}`` while the API process runs."""
        return self._send(Call("GET", "/healthz", None, _liveness))

    def ready(self) -> Readiness:
        """Readiness (``GET /readyz``); not ready is an answer (``ready=False``), not an error."""
        return self._send(Call("GET", "/readyz", None, Readiness.from_json, accept=(200, 503)))

    # -- models and optimizer steps (POST /v1/model/*, /v1/step) --------------------------------------

    def describe_model(
        self, model: Mapping[str, Any], *, optimizer: str | Mapping[str, Any] | None = None
    ) -> ModelDescription:
        """A model spec's weights (get_weights() order), parameter counts and shapes."""
        return self._send(describe_call(model, optimizer))

    def model_gradient(
        self,
        model: Mapping[str, Any],
        x: ArrayLike,
        y: ArrayLike | None = None,
        *,
        weights: Sequence[ArrayLike] | None = None,
        loss: str | Mapping[str, Any] | None = None,
        wrt: Sequence[str] | str | None = None,
        tangents: Sequence[ArrayLike] | None = None,
        saliency: bool = False,
        adversarial: Mapping[str, Any] | None = None,
        training: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
    ) -> ModelGradient:
        """Loss and gradients w.r.t. the weights and/or inputs (``wrt``), hvp, saliency, adversarial x."""
        call = model_gradient_call(
            self.codec,
            model,
            x,
            y,
            weights=weights,
            loss=loss,
            wrt=wrt,
            tangents=tangents,
            saliency=saliency,
            adversarial=adversarial,
            training=training,
            dtype=dtype,
            timeout_s=timeout_s,
        )
        return self._send(call)

    def adversarial(
        self,
        model: Mapping[str, Any],
        x: ArrayLike,
        y: ArrayLike,
        *,
        epsilon: float,
        method: str = "fgsm",
        steps: int | None = None,
        step_size: float | None = None,
        clip_min: float | None = None,
        clip_max: float | None = None,
        weights: Sequence[ArrayLike] | None = None,
        loss: str | Mapping[str, Any] | None = None,
        dtype: str | None = None,
        timeout_s: float | None = None,
    ) -> ModelGradient:
        """Adversarial examples (FGSM or PGD from the input gradient): ``.x_adv``, ``.adversarial_loss``."""
        attack = {"method": method, "epsilon": epsilon, "steps": steps, "step_size": step_size}
        attack.update(clip_min=clip_min, clip_max=clip_max)
        call = model_gradient_call(
            self.codec,
            model,
            x,
            y,
            weights=weights,
            loss=loss,
            wrt=[],
            tangents=None,
            saliency=False,
            adversarial={k: v for k, v in attack.items() if v is not None},
            training=False,
            dtype=dtype,
            timeout_s=timeout_s,
        )
        return self._send(call)

    def train_step(
        self,
        model: Mapping[str, Any],
        x: ArrayLike,
        y: ArrayLike | None = None,
        *,
        optimizer: str | Mapping[str, Any],
        weights: Sequence[ArrayLike] | None = None,
        optimizer_state: Sequence[ArrayLike] | None = None,
        loss: str | Mapping[str, Any] | None = None,
        clip: Mapping[str, Any] | None = None,
        objective: str | Mapping[str, Any] | None = None,
        steps: int = 1,
        return_gradients: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
    ) -> TrainResult:
        """``steps`` clipped optimizer steps in one call; feed ``weights`` and ``optimizer_state`` back."""
        call = train_call(
            self.codec,
            model,
            x,
            y,
            optimizer=optimizer,
            weights=weights,
            optimizer_state=optimizer_state,
            loss=loss,
            clip=clip,
            objective=objective,
            steps=steps,
            return_gradients=return_gradients,
            stream=False,
            progress_every=None,
            dtype=dtype,
            timeout_s=timeout_s,
        )
        return self._send(call)

    def train(
        self,
        model: Mapping[str, Any],
        x: ArrayLike,
        y: ArrayLike | None = None,
        *,
        optimizer: str | Mapping[str, Any],
        steps: int,
        progress_every: int | None = None,
        weights: Sequence[ArrayLike] | None = None,
        optimizer_state: Sequence[ArrayLike] | None = None,
        loss: str | Mapping[str, Any] | None = None,
        clip: Mapping[str, Any] | None = None,
        objective: str | Mapping[str, Any] | None = None,
        dtype: str | None = None,
        timeout_s: float | None = None,
    ) -> TrainingRun:
        """A streamed multi-step run: iterate it for ``TrainProgress``; ``.result`` holds the end."""
        call = train_call(
            self.codec,
            model,
            x,
            y,
            optimizer=optimizer,
            weights=weights,
            optimizer_state=optimizer_state,
            loss=loss,
            clip=clip,
            objective=objective,
            steps=steps,
            return_gradients=False,
            stream=True,
            progress_every=progress_every,
            dtype=dtype,
            timeout_s=timeout_s,
        )
        return TrainingRun(self._stream(call), dtype or "float32")

    def step(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        optimizer: str | Mapping[str, Any],
        optimizer_state: Sequence[ArrayLike] | None = None,
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        clip: Mapping[str, Any] | None = None,
        steps: int = 1,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> StepResult:
        """``steps`` optimizer steps minimizing a scalar expression; returns the new variables."""
        call = step_call(
            self.codec,
            expression,
            merge_variables(variables, kw_variables),
            optimizer=optimizer,
            optimizer_state=optimizer_state,
            constants=constants,
            functions=functions,
            clip=clip,
            steps=steps,
            dtype=dtype,
            timeout_s=timeout_s,
        )
        return self._send(call)


class AsyncClient(_Base):
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
        retry = crashes = 0
        while True:
            try:
                try:
                    response = await self._http.request(**self._request_args(call))
                except httpx.TransportError as error:
                    raise _transport_error(error, self.base_url) from error
                _raise_for_status(response, call.accept)
                return call.parse(_decode_json(response.content, call.path))
            except TapeserveError as error:
                delay = self.retry.delay(retry, error, crashes)
                if delay is None:
                    raise
                crashes += isinstance(error, WorkerCrashed)
            await self._sleep(delay)
            retry += 1

    async def _stream(self, call: Call[Any]) -> AsyncIterator[dict[str, Any]]:
        """The NDJSON lines of a streamed answer; retried only until the first line arrives."""
        retry = crashes = 0
        while True:
            started = False
            try:
                try:
                    async with self._http.stream(**self._request_args(call)) as response:
                        if response.status_code not in call.accept:
                            await response.aread()
                            _raise_for_status(response, call.accept)
                        async for line in response.aiter_lines():
                            for item in _ndjson_lines([line]):
                                started = True
                                yield item
                        return
                except httpx.TransportError as error:
                    raise _transport_error(error, self.base_url) from error
            except TapeserveError as error:
                delay = None if started else self.retry.delay(retry, error, crashes)
                if delay is None:
                    raise
                crashes += isinstance(error, WorkerCrashed)
            await self._sleep(delay)
            retry += 1

    # -- POST /v1/gradient ----------------------------------------------------------------------------

    async def compute(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        derivatives: Sequence[str] = ("gradient",),
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        tangents: Mapping[str, ArrayLike] | None = None,
        cotangent: ArrayLike | None = None,
        order: int | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> Derivatives:
        """Everything ``POST /v1/gradient`` can return in one call: the value and ``derivatives``."""
        return await self._send(
            self._gradient_call(
                expression,
                variables,
                kw_variables,
                derivatives,
                _same,
                tangents=tangents,
                cotangent=cotangent,
                order=order,
                **_options(constants, functions, wrt, batch, dtype, timeout_s),
            )
        )

    async def gradient(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> dict[str, np.ndarray]:
        """The gradient of the sum of the expression, per variable: ``gradient("sum(x**2)", x=[1, 2])``."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        call = self._gradient_call(
            expression, variables, kw_variables, ["gradient"], _pick_gradient, **options
        )
        return await self._send(call)

    async def value_and_grad(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The value and the gradient (per variable) from one evaluation."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        call = self._gradient_call(
            expression, variables, kw_variables, ["gradient"], _pick_value_and_grad, **options
        )
        return await self._send(call)

    async def jacobian(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> dict[str, np.ndarray]:
        """Per variable, the Jacobian of shape ``value.shape + var.shape``."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        call = self._gradient_call(
            expression, variables, kw_variables, ["jacobian"], _pick_jacobian, **options
        )
        return await self._send(call)

    async def hessian(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> dict[str, dict[str, np.ndarray]]:
        """The Hessian blocks of a scalar expression: ``result[a][b]`` has shape ``a.shape + b.shape``."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        call = self._gradient_call(expression, variables, kw_variables, ["hessian"], _pick_hessian, **options)
        return await self._send(call)

    async def hvp(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        tangents: Mapping[str, ArrayLike],
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> dict[str, np.ndarray]:
        """The Hessian-vector product with ``tangents`` (one per wrt variable), per variable."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        call = self._gradient_call(
            expression, variables, kw_variables, ["hvp"], _pick_hvp, tangents=tangents, **options
        )
        return await self._send(call)

    async def jvp(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        tangents: Mapping[str, ArrayLike],
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> np.ndarray:
        """The Jacobian-vector product with ``tangents``: an array of the value's shape."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        call = self._gradient_call(
            expression, variables, kw_variables, ["jvp"], _pick_jvp, tangents=tangents, **options
        )
        return await self._send(call)

    async def vjp(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        cotangent: ArrayLike,
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> dict[str, np.ndarray]:
        """The vector-Jacobian product with ``cotangent`` (of the value's shape), per variable."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        call = self._gradient_call(
            expression, variables, kw_variables, ["vjp"], _pick_vjp, cotangent=cotangent, **options
        )
        return await self._send(call)

    async def derivative(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        order: int,
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        wrt: Iterable[str] | str | None = None,
        batch: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> list[np.ndarray]:
        """The 1st..``order``-th derivatives of a scalar expression w.r.t. its one (wrt) variable."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        call = self._gradient_call(
            expression, variables, kw_variables, [], _pick_derivatives, order=order, **options
        )
        return await self._send(call)

    # -- the language and health ----------------------------------------------------------------------

    async def functions(self) -> Functions:
        """The built-in functions, constants and syntax of the expression language."""
        return await self._send(Call("GET", "/v1/functions", None, Functions.from_json))

    async def health(self) -> dict[str, Any]:
        """Liveness (``GET /healthz``): ``{"status": "ok"}`` while the API process runs."""
        return await self._send(Call("GET", "/healthz", None, _liveness))

    async def ready(self) -> Readiness:
        """Readiness (``GET /readyz``); not ready is an answer (``ready=False``), not an error."""
        return await self._send(Call("GET", "/readyz", None, Readiness.from_json, accept=(200, 503)))

    # -- models and optimizer steps (POST /v1/model/*, /v1/step) --------------------------------------

    async def describe_model(
        self, model: Mapping[str, Any], *, optimizer: str | Mapping[str, Any] | None = None
    ) -> ModelDescription:
        """A model spec's weights (get_weights() order), parameter counts and shapes."""
        return await self._send(describe_call(model, optimizer))

    async def model_gradient(
        self,
        model: Mapping[str, Any],
        x: ArrayLike,
        y: ArrayLike | None = None,
        *,
        weights: Sequence[ArrayLike] | None = None,
        loss: str | Mapping[str, Any] | None = None,
        wrt: Sequence[str] | str | None = None,
        tangents: Sequence[ArrayLike] | None = None,
        saliency: bool = False,
        adversarial: Mapping[str, Any] | None = None,
        training: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
    ) -> ModelGradient:
        """Loss and gradients w.r.t. the weights and/or inputs (``wrt``), hvp, saliency, adversarial x."""
        call = model_gradient_call(
            self.codec,
            model,
            x,
            y,
            weights=weights,
            loss=loss,
            wrt=wrt,
            tangents=tangents,
            saliency=saliency,
            adversarial=adversarial,
            training=training,
            dtype=dtype,
            timeout_s=timeout_s,
        )
        return await self._send(call)

    async def adversarial(
        self,
        model: Mapping[str, Any],
        x: ArrayLike,
        y: ArrayLike,
        *,
        epsilon: float,
        method: str = "fgsm",
        steps: int | None = None,
        step_size: float | None = None,
        clip_min: float | None = None,
        clip_max: float | None = None,
        weights: Sequence[ArrayLike] | None = None,
        loss: str | Mapping[str, Any] | None = None,
        dtype: str | None = None,
        timeout_s: float | None = None,
    ) -> ModelGradient:
        """Adversarial examples (FGSM or PGD from the input gradient): ``.x_adv``, ``.adversarial_loss``."""
        attack = {"method": method, "epsilon": epsilon, "steps": steps, "step_size": step_size}
        attack.update(clip_min=clip_min, clip_max=clip_max)
        call = model_gradient_call(
            self.codec,
            model,
            x,
            y,
            weights=weights,
            loss=loss,
            wrt=[],
            tangents=None,
            saliency=False,
            adversarial={k: v for k, v in attack.items() if v is not None},
            training=False,
            dtype=dtype,
            timeout_s=timeout_s,
        )
        return await self._send(call)

    async def train_step(
        self,
        model: Mapping[str, Any],
        x: ArrayLike,
        y: ArrayLike | None = None,
        *,
        optimizer: str | Mapping[str, Any],
        weights: Sequence[ArrayLike] | None = None,
        optimizer_state: Sequence[ArrayLike] | None = None,
        loss: str | Mapping[str, Any] | None = None,
        clip: Mapping[str, Any] | None = None,
        objective: str | Mapping[str, Any] | None = None,
        steps: int = 1,
        return_gradients: bool = False,
        dtype: str | None = None,
        timeout_s: float | None = None,
    ) -> TrainResult:
        """``steps`` clipped optimizer steps in one call; feed ``weights`` and ``optimizer_state`` back."""
        call = train_call(
            self.codec,
            model,
            x,
            y,
            optimizer=optimizer,
            weights=weights,
            optimizer_state=optimizer_state,
            loss=loss,
            clip=clip,
            objective=objective,
            steps=steps,
            return_gradients=return_gradients,
            stream=False,
            progress_every=None,
            dtype=dtype,
            timeout_s=timeout_s,
        )
        return await self._send(call)

    def train(
        self,
        model: Mapping[str, Any],
        x: ArrayLike,
        y: ArrayLike | None = None,
        *,
        optimizer: str | Mapping[str, Any],
        steps: int,
        progress_every: int | None = None,
        weights: Sequence[ArrayLike] | None = None,
        optimizer_state: Sequence[ArrayLike] | None = None,
        loss: str | Mapping[str, Any] | None = None,
        clip: Mapping[str, Any] | None = None,
        objective: str | Mapping[str, Any] | None = None,
        dtype: str | None = None,
        timeout_s: float | None = None,
    ) -> AsyncTrainingRun:
        """A streamed multi-step run: iterate it for ``TrainProgress``; ``.result`` holds the end."""
        call = train_call(
            self.codec,
            model,
            x,
            y,
            optimizer=optimizer,
            weights=weights,
            optimizer_state=optimizer_state,
            loss=loss,
            clip=clip,
            objective=objective,
            steps=steps,
            return_gradients=False,
            stream=True,
            progress_every=progress_every,
            dtype=dtype,
            timeout_s=timeout_s,
        )
        return AsyncTrainingRun(self._stream(call), dtype or "float32")

    async def step(
        self,
        expression: Expr | str,
        variables: Mapping[str, ArrayLike] | None = None,
        /,
        *,
        optimizer: str | Mapping[str, Any],
        optimizer_state: Sequence[ArrayLike] | None = None,
        constants: Mapping[str, ArrayLike] | None = None,
        functions: Mapping[str, Any] | None = None,
        clip: Mapping[str, Any] | None = None,
        steps: int = 1,
        dtype: str | None = None,
        timeout_s: float | None = None,
        **kw_variables: ArrayLike,
    ) -> StepResult:
        """``steps`` optimizer steps minimizing a scalar expression; returns the new variables."""
        call = step_call(
            self.codec,
            expression,
            merge_variables(variables, kw_variables),
            optimizer=optimizer,
            optimizer_state=optimizer_state,
            constants=constants,
            functions=functions,
            clip=clip,
            steps=steps,
            dtype=dtype,
            timeout_s=timeout_s,
        )
        return await self._send(call)
