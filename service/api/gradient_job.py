"""Between wire and engine: a GradientRequest becomes a GradientJob, and a GradientResult a response body.

Everything knowable without TensorFlow is checked here, in the API process, so bad requests never
reach a worker: names, shapes of tangents and batches, element limits, and the whole program
(``build_program`` parses and resolves every piece of text).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from service.api.offload import RequestWork, claimed_elements
from service.api.schemas import GradientRequest
from service.engine.jobs import GradientJob, GradientResult
from service.errors import InvalidRequest, LimitExceeded, ShapeError
from service.expr.program import check_program, unchecked_chars
from service.limits import Limits
from service.tensorcodec import Encoding, decode_tensor, encode_tensor

__all__ = ["build_gradient_job", "render_gradient_result", "request_work"]


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _functions(request: GradientRequest) -> dict[str, dict[str, Any]]:
    return {
        name: {"params": list(spec.params), "body": spec.body, "gradient": spec.gradient}
        for name, spec in request.functions.items()
    }


def request_work(request: GradientRequest, limits: Limits) -> RequestWork:
    """What ``build_gradient_job`` will cost for this (parsed) request: decides where it runs."""
    tensors = [*request.variables.values(), *request.constants.values(), *(request.tangents or {}).values()]
    if request.cotangent is not None:
        tensors.append(request.cotangent)
    program = unchecked_chars(
        request.expression, list(request.variables), list(request.constants), _functions(request), limits
    )
    return RequestWork(elements=claimed_elements(tensors), program_chars=program)


def build_gradient_job(request: GradientRequest, limits: Limits) -> GradientJob:
    """The engine job for a request, or the TapeserveError that explains what is wrong with it."""
    derivatives = _unique(list(request.derivatives))
    variables_names = list(request.variables)
    wrt = _check_names(request, derivatives, variables_names)
    if request.order is not None and request.order > limits.max_order:
        raise LimitExceeded(
            f"order {request.order} asked; at most {limits.max_order} is allowed",
            limit="max_order",
            allowed=limits.max_order,
            field="order",
        )
    functions = _functions(request)
    # Text first: parsing is cheap and catches most mistakes (and all hostile text) before tensors are read.
    check_program(request.expression, variables_names, list(request.constants), functions, limits)

    dtype = request.dtype
    cap = limits.max_input_elements

    def decode(value: Any, field: str) -> np.ndarray:
        return decode_tensor(value, dtype, field=field, max_elements=cap)

    variables = {name: decode(value, f"variables.{name}") for name, value in request.variables.items()}
    constants = {name: decode(value, f"constants.{name}") for name, value in request.constants.items()}
    tangents = {name: decode(value, f"tangents.{name}") for name, value in (request.tangents or {}).items()}
    cotangent = None if request.cotangent is None else decode(request.cotangent, "cotangent")

    batch = _check_batch(request.batch, variables, limits)
    for name, tangent in tangents.items():
        if tangent.shape != variables[name].shape:
            raise ShapeError(
                f"tangents.{name} has shape {list(tangent.shape)} but variable {name} has shape "
                f"{list(variables[name].shape)}",
                field=f"tangents.{name}",
            )
    _check_output_sizes(request, derivatives, wrt, variables, batch, limits)
    return GradientJob(
        expression=request.expression,
        variables=variables,
        constants=constants,
        functions=functions,
        derivatives=derivatives,
        wrt=None if request.wrt is None else wrt,
        tangents=tangents,
        cotangent=cotangent,
        order=request.order,
        batch=request.batch,
        dtype=dtype,
    )


def _check_names(
    request: GradientRequest, derivatives: tuple[str, ...], variables: list[str]
) -> tuple[str, ...]:
    if request.wrt is not None:
        wrt = _unique(request.wrt)
        for name in wrt:
            if name not in request.variables:
                hint = " (constants are not differentiated)" if name in request.constants else ""
                raise InvalidRequest(
                    f"wrt names {name!r}, which is not a variable{hint}; "
                    f"variables: {', '.join(variables) or 'none'}",
                    field="wrt",
                )
    else:
        wrt = tuple(variables)
    wants_tangents = [d for d in derivatives if d in ("hvp", "jvp")]
    if wants_tangents:
        given = request.tangents or {}
        missing = [name for name in wrt if name not in given]
        if missing:
            raise InvalidRequest(
                f"{' and '.join(wants_tangents)} need tangents for every wrt variable; "
                f"missing: {', '.join(missing)}",
                field="tangents",
            )
        extra = [name for name in given if name not in wrt]
        if extra:
            raise InvalidRequest(
                f"tangents given for {', '.join(extra)}, which {'is' if len(extra) == 1 else 'are'} "
                "not in wrt",
                field=f"tangents.{extra[0]}",
            )
    elif request.tangents:
        raise InvalidRequest(
            "tangents are only used by hvp and jvp, and neither was requested", field="tangents"
        )
    if "vjp" in derivatives and request.cotangent is None:
        raise InvalidRequest("vjp needs a cotangent (a tensor of the value's shape)", field="cotangent")
    if "vjp" not in derivatives and request.cotangent is not None:
        raise InvalidRequest("cotangent is only used by vjp, which was not requested", field="cotangent")
    if request.order is not None and len(wrt) != 1:
        raise InvalidRequest(
            f"order needs exactly one variable to differentiate (give wrt: [name]); got {len(wrt)}",
            field="wrt" if request.wrt is not None else "order",
        )
    return wrt


def _check_batch(batch: bool, variables: dict[str, np.ndarray], limits: Limits) -> int:
    """The batch size (1 without batch), after checking every variable has the same leading axis."""
    if not batch:
        return 1
    if not variables:
        raise InvalidRequest("batch needs at least one variable", field="batch")
    sizes: dict[str, int] = {}
    for name, value in variables.items():
        if value.ndim == 0:
            raise ShapeError(
                f"with batch, variables.{name} needs a leading batch axis; it is a scalar",
                field=f"variables.{name}",
            )
        sizes[name] = value.shape[0]
    first, size = next(iter(sizes.items()))
    for name, other in sizes.items():
        if other != size:
            raise ShapeError(
                f"with batch, every variable has the same leading axis: {first} has {size}, "
                f"{name} has {other}",
                field=f"variables.{name}",
            )
    if size > limits.max_batch:
        raise LimitExceeded(
            f"batch of {size} points; at most {limits.max_batch} are allowed",
            limit="max_batch",
            allowed=limits.max_batch,
            field="batch",
        )
    return size


def _check_output_sizes(
    request: GradientRequest,
    derivatives: tuple[str, ...],
    wrt: tuple[str, ...],
    variables: dict[str, np.ndarray],
    batch: int,
    limits: Limits,
) -> None:
    """Refuse outputs whose size follows from the input shapes alone (Hessian blocks, higher orders)."""

    def point_size(name: str) -> int:
        size = variables[name].size
        return size // batch if request.batch and batch else size

    def refuse(what: str, count: int) -> LimitExceeded:
        return LimitExceeded(
            f"{what} would have {count} elements; at most {limits.max_tensor_elements} are allowed",
            limit="max_tensor_elements",
            allowed=limits.max_tensor_elements,
            requested=count,
        )

    if "hessian" in derivatives:
        for a in wrt:
            for b in wrt:
                count = batch * point_size(a) * point_size(b)
                if count > limits.max_tensor_elements:
                    raise refuse(f"hessian[{a}][{b}]", count)
    if request.order is not None:
        name = wrt[0]
        n = point_size(name)
        # Compare in logarithms: n ** order is an exact big int only when it is small.
        if n > 1 and request.order * math.log(n) + math.log(batch) > math.log(limits.max_tensor_elements):
            raise refuse(
                f"the order-{request.order} derivative with respect to {name}", batch * n**request.order
            )


def render_gradient_result(
    result: GradientResult, job: GradientJob, encoding: Encoding, total_ms: float
) -> dict[str, Any]:
    """The response body: value, every requested derivative, dtype and meta (numpy arrays kept for orjson)."""

    def enc(array: Any) -> Any:
        return encode_tensor(array, encoding, keep_arrays=True)

    def enc_map(arrays: dict[str, Any] | None) -> dict[str, Any]:
        return {name: enc(array) for name, array in (arrays or {}).items()}

    body: dict[str, Any] = {"value": enc(result.value)}
    for name in job.derivatives:
        if name == "hessian":
            body["hessian"] = {a: enc_map(row) for a, row in (result.hessian or {}).items()}
        elif name == "jvp":
            body["jvp"] = None if result.jvp is None else enc(result.jvp)
        else:
            body[name] = enc_map(getattr(result, name))
    if job.order is not None and result.higher is not None:
        body["derivative"] = {
            "variable": result.higher["variable"],
            "order": result.higher["order"],
            "derivatives": [enc(t) for t in result.higher["derivatives"]],
        }
    body["dtype"] = job.dtype
    body["meta"] = {
        "cache": result.cache,
        "compute_ms": round(float(result.compute_ms), 3),
        "total_ms": round(total_ms, 3),
        "executor": result.executor,
    }
    return body
