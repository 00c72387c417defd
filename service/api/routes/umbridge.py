"""UM-Bridge protocol 1.0 under /umbridge: the models file's models and the generic `expression` model.

Each endpoint checks its request in the protocol's order (model name, feature support, input sizes,
indices, vector sizes), builds a GradientJob (``service.umbridge.jobs``) and runs it on the same
worker pool and compiled tape programs as /v1/gradient. Every failure is the protocol's
``{"error": {"type", "message"}}``: raised ones here, and any problem+json answer the rest of the
app gives under /umbridge (unknown endpoint, wrong method, body too large) via the middleware below.

These routes do not use TapeserveRoute: the protocol's clients and conformance tests post JSON
without a Content-Type, and its error envelope is not problem+json.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import OrjsonResponse, PoolDep, SettingsDep
from service.api.offload import ON_LOOP_PROGRAM_CHARS, RequestWork, claimed_elements, off_loop_if
from service.api.problems import PROBLEM_MEDIA_TYPE
from service.api.settings import Settings
from service.errors import InvalidRequest, TapeserveError
from service.jobs import GradientJob, GradientResult
from service.tensorcodec import decode_tensor, encode_tensor
from service.umbridge import jobs
from service.umbridge.protocol import (
    PROTOCOL_VERSION,
    UMApplyHessianRequest,
    UMApplyJacobianRequest,
    UMBridgeError,
    UMErrorResponse,
    UMEvaluateRequest,
    UMEvaluateResponse,
    UMGradientRequest,
    UMInfoResponse,
    UMInputSizesResponse,
    UMModelInfoRequest,
    UMModelInfoResponse,
    UMOutputSizesResponse,
    UMSizesRequest,
    UMVectorResponse,
    from_tapeserve_error,
)
from service.umbridge.spec import (
    DTYPE,
    FEATURES,
    GENERIC_MODEL,
    UMModel,
    config_work,
    describe_error,
    model_from_config,
)

__all__ = ["PREFIX", "UMBridgeErrorsMiddleware", "router"]

log = logging.getLogger("tapeserve.api")

PREFIX = "/umbridge"
router = APIRouter(prefix=PREFIX, tags=["umbridge"])

R = TypeVar("R", bound=BaseModel)


def _error_response(error: UMBridgeError) -> Response:
    return OrjsonResponse(error.body(), status_code=error.status, headers=error.headers)


async def _answer(request: Request, work: Callable[[], Awaitable[dict[str, Any]]]) -> Response:
    """Run an endpoint's work; every exception becomes the protocol's error body."""
    try:
        return OrjsonResponse(await work())
    except UMBridgeError as error:
        return _error_response(error)
    except TapeserveError as error:
        return _error_response(from_tapeserve_error(error, server_side=False, output="the output"))
    except Exception:
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(
            UMBridgeError("InternalError", "an internal error occurred; it has been logged", 500)
        )


class _Body:
    """A parsed request body, and whether it was large (then its validation runs in a thread too)."""

    def __init__(self, data: dict[str, Any], large: bool) -> None:
        self.data = data
        self.large = large

    async def parse(self, schema: type[R]) -> R:
        return await off_loop_if(self.large, _parse, schema, self.data)


def _loads(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)  # strict RFC 8259: no NaN literals
    except orjson.JSONDecodeError as error:
        raise UMBridgeError("InvalidInput", f"the request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise UMBridgeError("InvalidInput", "the request body must be a JSON object")
    return data


async def _body(request: Request) -> _Body:
    raw = await request.body()
    large = RequestWork(body_bytes=len(raw)).costly
    return _Body(await off_loop_if(large, _loads, raw), large)


def _models(request: Request) -> dict[str, UMModel]:
    models: dict[str, UMModel] = request.app.state.umbridge_models
    return models


def _model(request: Request, data: dict[str, Any], settings: Settings) -> UMModel | None:
    """The named model, or None for the generic one (its config is read once the feature is known)."""
    name = data.get("name")
    if not isinstance(name, str):
        raise UMBridgeError("InvalidInput", "name must be a string: a model name as GET /Info lists it")
    if name == GENERIC_MODEL:
        return None
    models = _models(request)
    model = models.get(name)
    if model is None:
        listed = ", ".join([*models, GENERIC_MODEL])
        raise UMBridgeError("ModelNotFound", f"no model {name[:100]!r}; this server has: {listed}")
    return model


def _require(model: UMModel | None, feature: str) -> None:
    if model is not None and not model.support.get(feature, False):
        raise UMBridgeError("UnsupportedFeature", f"model {model.name!r} does not support {feature}")


async def _configured(model: UMModel | None, config: Any, settings: Settings, large: bool) -> UMModel:
    """``_configure`` on the event loop when the config is cached or small, else in a thread."""
    costly = large or (model is None and config_work(config, settings.limits()) > ON_LOOP_PROGRAM_CHARS)
    return await off_loop_if(costly, _configure, model, config, settings)


def _configure(model: UMModel | None, config: Any, settings: Settings) -> UMModel:
    """The model a request computes with: a named one (which takes no config) or the config's."""
    if model is None:
        try:
            return model_from_config(config, settings.limits())
        except InvalidRequest as error:
            raise UMBridgeError("InvalidInput", describe_error(error)) from None
    if config:
        keys = (
            ", ".join(sorted(map(str, config)))[:200] if isinstance(config, dict) else type(config).__name__
        )
        raise UMBridgeError(
            "InvalidInput", f"model {model.name!r} takes no config; send {{}} or leave it out (got: {keys})"
        )
    return model


def _parse(schema: type[R], data: dict[str, Any]) -> R:
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        parts = []
        for item in error.errors()[:5]:
            path = ""
            for part in item.get("loc", ()):
                path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
            parts.append(f"{path or 'body'}: {item.get('msg', '')}")
        raise UMBridgeError("InvalidInput", "; ".join(parts)) from None


def _vector(value: Any, size: int, field: str, what: str, settings: Settings) -> np.ndarray:
    try:
        array = decode_tensor(value, DTYPE, field=field, max_elements=settings.max_input_elements)
    except TapeserveError as error:
        raise UMBridgeError("InvalidInput", describe_error(error)) from None
    if array.ndim != 1:
        raise UMBridgeError("InvalidInput", f"{field} must be a list of numbers, not {array.ndim}-D")
    if array.shape[0] != size:
        raise UMBridgeError("InvalidInput", f"{field} has {array.shape[0]} numbers; {what} has size {size}")
    return array


def _inputs(model: UMModel, values: list[Any], settings: Settings) -> list[np.ndarray]:
    sizes = list(model.input_sizes)
    if len(values) != len(sizes):
        raise UMBridgeError(
            "InvalidInput",
            f"input has {len(values)} vectors; model {model.name!r} takes {len(sizes)} (inputSizes {sizes})",
        )
    return [
        _vector(value, size, f"input[{i}]", f"input {i} of model {model.name!r}", settings)
        for i, (value, size) in enumerate(zip(values, sizes, strict=True))
    ]


def _index(value: int, count: int, field: str, what: str, model: UMModel) -> int:
    if not 0 <= value < count:
        raise UMBridgeError(
            "InvalidInput",
            f"{field} is {value}; model {model.name!r} has {count} {what} (indices 0 to {count - 1})",
        )
    return value


async def _prepare(body: UMEvaluateRequest, build: Callable[[], GradientJob]) -> GradientJob:
    """``build`` (which decodes the request's vectors) in a thread when they are many."""
    vectors = [*body.input, *(getattr(body, name) for name in ("sens", "vec") if hasattr(body, name))]
    return await off_loop_if(RequestWork(elements=claimed_elements(vectors)).costly, build)


async def _run(
    job: GradientJob, model: UMModel, output: str, pool: PoolDep, settings: Settings
) -> GradientResult:
    try:
        result = await pool.run(job, timeout_s=settings.request_timeout_s, affinity=job.signature())
    except TapeserveError as error:
        raise from_tapeserve_error(error, server_side=model.server_side, output=output) from None
    if not isinstance(result, GradientResult):
        raise TapeserveError(f"the worker returned {type(result).__name__}, not a GradientResult")
    return result


def _vector_out(array: np.ndarray | None, size: int, what: str, model: UMModel) -> Any:
    flat = np.asarray(array).reshape(-1)
    if flat.shape[0] != size:  # the engine's reshape makes this unreachable; kept as the protocol's check
        raise UMBridgeError("InvalidOutput", f"{what} has {flat.shape[0]} elements, expected {size}", 500)
    return encode_tensor(flat, "json", keep_arrays=True)


# --- endpoints ---------------------------------------------------------------------------------


async def info(request: Request) -> Response:
    """Protocol version and the models this server offers."""
    return OrjsonResponse({"protocolVersion": PROTOCOL_VERSION, "models": [*_models(request), GENERIC_MODEL]})


async def model_info(request: Request, settings: SettingsDep) -> Response:
    """Which of Evaluate, Gradient, ApplyJacobian and ApplyHessian a model supports."""

    async def work() -> dict[str, Any]:
        received = await _body(request)
        model = _model(request, received.data, settings)
        await received.parse(UMModelInfoRequest)
        support = dict.fromkeys(FEATURES, True) if model is None else dict(model.support)
        return {"support": support}

    return await _answer(request, work)


async def input_sizes(request: Request, settings: SettingsDep) -> Response:
    """The sizes of the model's input vectors (for `expression`: from its config)."""

    async def work() -> dict[str, Any]:
        received = await _body(request)
        model = _model(request, received.data, settings)
        body = await received.parse(UMSizesRequest)
        configured = await _configured(model, body.config, settings, received.large)
        return {"inputSizes": list(configured.input_sizes)}

    return await _answer(request, work)


async def output_sizes(request: Request, settings: SettingsDep) -> Response:
    """The sizes of the model's output vectors (for `expression`: from its config)."""

    async def work() -> dict[str, Any]:
        received = await _body(request)
        model = _model(request, received.data, settings)
        body = await received.parse(UMSizesRequest)
        configured = await _configured(model, body.config, settings, received.large)
        return {"outputSizes": list(configured.output_sizes)}

    return await _answer(request, work)


async def evaluate(request: Request, pool: PoolDep, settings: SettingsDep) -> Response:
    """The model's outputs at the given inputs."""

    async def work() -> dict[str, Any]:
        received = await _body(request)
        named = _model(request, received.data, settings)
        _require(named, "Evaluate")
        body = await received.parse(UMEvaluateRequest)
        model = await _configured(named, body.config, settings, received.large)

        def build() -> GradientJob:
            return jobs.evaluate_job(model, _inputs(model, body.input, settings))

        job = await _prepare(body, build)
        result = await _run(job, model, "an output", pool, settings)
        value = np.asarray(result.value).reshape(-1)
        total = sum(model.output_sizes)
        if value.shape[0] != total:
            raise UMBridgeError(
                "InvalidOutput", f"the outputs have {value.shape[0]} elements, expected {total}", 500
            )
        cuts = np.cumsum(model.output_sizes)[:-1]
        return {"output": [encode_tensor(part, "json", keep_arrays=True) for part in np.split(value, cuts)]}

    return await _answer(request, work)


async def gradient(request: Request, pool: PoolDep, settings: SettingsDep) -> Response:
    """J^T sens: the gradient of sens . F_outWrt with respect to input inWrt."""

    async def work() -> dict[str, Any]:
        received = await _body(request)
        named = _model(request, received.data, settings)
        _require(named, "Gradient")
        body = await received.parse(UMGradientRequest)
        model = await _configured(named, body.config, settings, received.large)

        def build() -> GradientJob:
            inputs = _inputs(model, body.input, settings)
            out = _index(body.outWrt, len(model.output_sizes), "outWrt", "outputs", model)
            inp = _index(body.inWrt, len(model.input_sizes), "inWrt", "inputs", model)
            sens = _vector(body.sens, model.output_sizes[out], "sens", f"output {out}", settings)
            return jobs.gradient_job(model, out, inp, inputs, sens)

        job = await _prepare(body, build)
        result = await _run(job, model, f"output {body.outWrt}", pool, settings)
        name = model.input_names[body.inWrt]
        size = model.input_sizes[body.inWrt]
        return {"output": _vector_out((result.vjp or {}).get(name), size, "the gradient", model)}

    return await _answer(request, work)


async def apply_jacobian(request: Request, pool: PoolDep, settings: SettingsDep) -> Response:
    """J vec: the Jacobian of output outWrt with respect to input inWrt, applied to vec."""

    async def work() -> dict[str, Any]:
        received = await _body(request)
        named = _model(request, received.data, settings)
        _require(named, "ApplyJacobian")
        body = await received.parse(UMApplyJacobianRequest)
        model = await _configured(named, body.config, settings, received.large)

        def build() -> GradientJob:
            inputs = _inputs(model, body.input, settings)
            out = _index(body.outWrt, len(model.output_sizes), "outWrt", "outputs", model)
            inp = _index(body.inWrt, len(model.input_sizes), "inWrt", "inputs", model)
            vec = _vector(body.vec, model.input_sizes[inp], "vec", f"input {inp}", settings)
            return jobs.jacobian_action_job(model, out, inp, inputs, vec)

        job = await _prepare(body, build)
        result = await _run(job, model, f"output {body.outWrt}", pool, settings)
        size = model.output_sizes[body.outWrt]
        return {"output": _vector_out(result.jvp, size, "the Jacobian action", model)}

    return await _answer(request, work)


async def apply_hessian(request: Request, pool: PoolDep, settings: SettingsDep) -> Response:
    """The Hessian of sens . F_outWrt, block (inWrt1, inWrt2), applied to vec."""

    async def work() -> dict[str, Any]:
        received = await _body(request)
        named = _model(request, received.data, settings)
        _require(named, "ApplyHessian")
        body = await received.parse(UMApplyHessianRequest)
        model = await _configured(named, body.config, settings, received.large)

        def build() -> GradientJob:
            inputs = _inputs(model, body.input, settings)
            out = _index(body.outWrt, len(model.output_sizes), "outWrt", "outputs", model)
            first = _index(body.inWrt1, len(model.input_sizes), "inWrt1", "inputs", model)
            second = _index(body.inWrt2, len(model.input_sizes), "inWrt2", "inputs", model)
            sens = _vector(body.sens, model.output_sizes[out], "sens", f"output {out}", settings)
            vec = _vector(body.vec, model.input_sizes[second], "vec", f"input {second}", settings)
            return jobs.hessian_action_job(model, out, first, second, inputs, sens, vec)

        job = await _prepare(body, build)
        result = await _run(job, model, f"output {body.outWrt}", pool, settings)
        name = model.input_names[body.inWrt1]
        size = model.input_sizes[body.inWrt1]
        return {"output": _vector_out((result.hvp or {}).get(name), size, "the Hessian action", model)}

    return await _answer(request, work)


def _body_schema(schema: type[BaseModel]) -> dict[str, Any]:
    content = {"application/json": {"schema": schema.model_json_schema()}}
    return {"requestBody": {"required": True, "content": content}}


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": UMErrorResponse, "description": "InvalidInput, ModelNotFound or UnsupportedFeature."},
    500: {
        "model": UMErrorResponse,
        "description": "InvalidOutput (a models-file model is faulty) or InternalError.",
    },
    503: {"model": UMErrorResponse, "description": "Overloaded (with Retry-After) or WorkerCrashed."},
    504: {"model": UMErrorResponse, "description": "Timeout."},
}

router.add_api_route(
    "/Info", info, methods=["GET"], operation_id="umbridge_info", summary=info.__doc__,
    responses={200: {"model": UMInfoResponse, "description": "Protocol version and model names."}},
)  # fmt: skip
for _path, _handler, _request_schema, _response, _operation in (
    ("/ModelInfo", model_info, UMModelInfoRequest, UMModelInfoResponse, "umbridge_model_info"),
    ("/InputSizes", input_sizes, UMSizesRequest, UMInputSizesResponse, "umbridge_input_sizes"),
    ("/OutputSizes", output_sizes, UMSizesRequest, UMOutputSizesResponse, "umbridge_output_sizes"),
    ("/Evaluate", evaluate, UMEvaluateRequest, UMEvaluateResponse, "umbridge_evaluate"),
    ("/Gradient", gradient, UMGradientRequest, UMVectorResponse, "umbridge_gradient"),
    ("/ApplyJacobian", apply_jacobian, UMApplyJacobianRequest, UMVectorResponse, "umbridge_apply_jacobian"),
    ("/ApplyHessian", apply_hessian, UMApplyHessianRequest, UMVectorResponse, "umbridge_apply_hessian"),
):
    router.add_api_route(
        _path,
        _handler,
        methods=["POST"],
        operation_id=_operation,
        summary=_handler.__doc__,
        response_model=None,
        openapi_extra=_body_schema(_request_schema),
        responses={200: {"model": _response, "description": "Success."}, **_ERRORS},
    )


# --- errors the rest of the app answers under /umbridge --------------------------------------------

_REPLACED_HEADERS = (b"content-type", b"content-length")
_TYPES_BY_CODE = {"not_found": "UnsupportedFeature", "method_not_allowed": "UnsupportedFeature"}


def _translate(problem: bytes) -> bytes:
    try:
        data = orjson.loads(problem)
    except orjson.JSONDecodeError:
        data = {}
    code = str(data.get("code", "")) if isinstance(data, dict) else ""
    status = int(data.get("status", 500)) if isinstance(data, dict) else 500
    detail = str(data.get("detail", "")) if isinstance(data, dict) else ""
    type_ = _TYPES_BY_CODE.get(code) or ("InvalidInput" if status < 500 else "InternalError")
    if code == "not_found":
        detail = (
            f"{detail}; UM-Bridge endpoints: Info, ModelInfo, InputSizes, OutputSizes, Evaluate, "
            "Gradient, ApplyJacobian, ApplyHessian"
        )
    return orjson.dumps({"error": {"type": type_, "message": detail}})


class UMBridgeErrorsMiddleware:
    """Rewrites problem+json answers under /umbridge into the protocol's error body (status kept)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def rewrite(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                if headers.get(b"content-type", b"").startswith(PROBLEM_MEDIA_TYPE.encode()):
                    start = message
                    return
                await send(message)
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):  # problem bodies are a few hundred bytes
                return
            body = _translate(b"".join(chunks))
            kept = [(k, v) for k, v in start.get("headers", []) if k.lower() not in _REPLACED_HEADERS]
            kept += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({**start, "headers": kept})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            start = None

        await self.app(scope, receive, rewrite)
