"""Between wire and engine: a GradientRequest becomes a GradientJob, and a GradientResult a response body.

Everything knowable without TensorFlow is checked here, in the API process, so bad requests never
reach a worker: names, shapes of tangents and batches (``service.jobs``' checks, which the engine
runs again), output sizes, and the whole program (``check_program`` parses and resolves every
piece of text).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from service.api.offload import RequestWork, claimed_elements
from service.api.schemas import GradientRequest
from service.errors import LimitExceeded
from service.expr.program import check_program, unchecked_chars
from service.jobs import (
    GradientJob,
    GradientResult,
    check_gradient_arrays,
    check_gradient_names,
    job_functions,
    loop_counts,
)
from service.limits import Limits
from service.tensorcodec import Encoding, decode_tensor, encode_tensor

__all__ = ["build_gradient_job", "render_gradient_result", "request_work"]


def request_work(request: GradientRequest, limits: Limits) -> RequestWork:
    """What ``build_gradient_job`` will cost for this (parsed) request: decides where it runs."""
    tensors = [*request.variables.values(), *request.constants.values(), *(request.tangents or {}).values()]
    if request.cotangent is not None:
        tensors.append(request.cotangent)
    program = unchecked_chars(
        request.expression,
        list(request.variables),
        list(request.constants),
        job_functions(request.functions),
        limits,
    )
    return RequestWork(elements=claimed_elements(tensors), program_chars=program)


def build_gradient_job(request: GradientRequest, limits: Limits) -> GradientJob:
    """The engine job for a request, or the TapeserveError that explains what is wrong with it."""
    derivatives = tuple(dict.fromkeys(request.derivatives))
    variables_names = list(request.variables)
    wrt = check_gradient_names(
        derivatives=derivatives,
        variables=variables_names,
        constants=request.constants,
        wrt=request.wrt,
        tangents=request.tangents,
        cotangent=request.cotangent is not None,
        order=request.order,
        dtype=request.dtype,
        limits=limits,
    )
    functions = job_functions(request.functions)
    # Text first: parsing is cheap and catches most mistakes (and all hostile text) before tensors are read.
    counts = check_program(request.expression, variables_names, list(request.constants), functions, limits)

    dtype = request.dtype
    cap = limits.max_input_elements

    def decode(value: Any, field: str) -> np.ndarray:
        return decode_tensor(value, dtype, field=field, max_elements=cap)

    variables = {name: decode(value, f"variables.{name}") for name, value in request.variables.items()}
    constants = {name: decode(value, f"constants.{name}") for name, value in request.constants.items()}
    tangents = {name: decode(value, f"tangents.{name}") for name, value in (request.tangents or {}).items()}
    cotangent = None if request.cotangent is None else decode(request.cotangent, "cotangent")

    batch = check_gradient_arrays(variables, tangents, batch=request.batch, limits=limits)
    loop_counts(constants, counts)
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
        counts=counts,
    )


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
