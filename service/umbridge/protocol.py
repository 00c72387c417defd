"""UM-Bridge protocol 1.0 on the wire: request and response schemas, and its error envelope.

Every failure is ``{"error": {"type": ..., "message": ...}}``. The protocol's types and statuses::

    InvalidInput         400  the request does not fit the model (sizes, indices, values, config)
    ModelNotFound        400  no model of that name
    UnsupportedFeature   400  the model does not offer that endpoint (404 for no such endpoint)
    InvalidOutput        500  a model of the models file does not produce its declared outputs

and tapeserve's own, for what the protocol has no word for (clients show type and message)::

    Overloaded           503  the queue is full; retry after Retry-After seconds
    WorkerCrashed        503  the worker died during the request; it is restarted, retrying is safe
    Timeout              504  the computation passed its deadline
    InternalError        500  a server fault (logged on the server, not described to the client)

Non-finite numbers travel as the strings "NaN", "Infinity", "-Infinity" both ways, so every body
is valid JSON (the protocol's own reference server writes bare ``nan``, which no parser accepts).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, WithJsonSchema

from service.errors import (
    DTypeError,
    NotDifferentiable,
    Overloaded,
    ShapeError,
    TapeserveError,
    Timeout,
    WorkerCrashed,
)
from service.umbridge.spec import describe_error

__all__ = [
    "PROTOCOL_VERSION",
    "UMApplyHessianRequest",
    "UMApplyJacobianRequest",
    "UMErrorResponse",
    "UMEvaluateRequest",
    "UMEvaluateResponse",
    "UMGradientRequest",
    "UMInfoResponse",
    "UMInputSizesResponse",
    "UMModelInfoRequest",
    "UMModelInfoResponse",
    "UMOutputSizesResponse",
    "UMSizesRequest",
    "UMBridgeError",
    "UMVectorResponse",
    "from_tapeserve_error",
]

PROTOCOL_VERSION = 1.0

ErrorType = Literal[
    "InvalidInput",
    "ModelNotFound",
    "UnsupportedFeature",
    "InvalidOutput",
    "Overloaded",
    "WorkerCrashed",
    "Timeout",
    "InternalError",
]


class UMBridgeError(Exception):
    """A protocol error: its type, message and HTTP status (and headers such as Retry-After)."""

    def __init__(
        self, type_: ErrorType, message: str, status: int = 400, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.type = type_
        self.message = message
        self.status = status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message}}


# TF's words for an output whose size is not the declared one (the reshape in service.umbridge.jobs).
_RESHAPE = re.compile(r"Cannot reshape a tensor with (\d+) elements to shape \[(\d+)\]")


def from_tapeserve_error(error: TapeserveError, *, server_side: bool, output: str) -> UMBridgeError:
    """How a failure of the computation is reported: whose fault it is decides type and status.

    ``server_side``: the model comes from the models file, so a model that cannot be built is the
    server's fault (InvalidOutput, 500); a generic model's definition is the client's (InvalidInput).
    ``output`` names the output(s) computed, for the size-mismatch message.
    """
    if isinstance(error, Overloaded):
        retry = getattr(error, "retry_after", None) or error.extra.get("retry_after") or 1
        return UMBridgeError(
            "Overloaded", error.detail, 503, {"Retry-After": str(max(1, math.ceil(float(retry))))}
        )
    if isinstance(error, Timeout):
        return UMBridgeError("Timeout", error.detail, 504)
    if isinstance(error, WorkerCrashed):
        return UMBridgeError("WorkerCrashed", error.detail, 503)
    if error.status >= 500:
        return UMBridgeError("InternalError", "an internal error occurred; it has been logged", 500)
    mismatch = _RESHAPE.search(error.detail) if isinstance(error, ShapeError) else None
    if mismatch is not None:
        message = f"{output} has {mismatch.group(1)} elements but declares size {mismatch.group(2)}"
        return (
            UMBridgeError("InvalidOutput", message, 500)
            if server_side
            else UMBridgeError("InvalidInput", f"config: {message}")
        )
    if server_side and isinstance(error, ShapeError | DTypeError | NotDifferentiable):
        return UMBridgeError(
            "InvalidOutput", f"the model cannot compute {output}: {describe_error(error)}", 500
        )
    return UMBridgeError("InvalidInput", describe_error(error))


# --- wire schemas (request bodies are checked field by field in the routes, in the protocol's order)

Vector = Annotated[
    list[Any],
    WithJsonSchema(
        {
            "type": "array",
            "items": {"anyOf": [{"type": "number"}, {"enum": ["NaN", "Infinity", "-Infinity"]}]},
            "description": 'Numbers; non-finite values as "NaN", "Infinity", "-Infinity".',
        }
    ),
]
Config = Annotated[
    dict[str, Any] | None,
    Field(
        description="Named models: absent or {}. Model `expression`: its definition "
        "({inputs: [{name, size}], outputs: [{expression, size}], constants, functions})."
    ),
]


class _Request(BaseModel):
    # Other servers ignore members they do not know (clients add some, e.g. for shared memory).
    model_config = ConfigDict(extra="ignore")


class UMModelInfoRequest(_Request):
    name: StrictStr = Field(description="The model's name, as listed by /Info.")


class UMSizesRequest(UMModelInfoRequest):
    config: Config = None


class UMEvaluateRequest(UMSizesRequest):
    input: list[Vector] = Field(description="One vector per model input, of the sizes /InputSizes gives.")


class UMGradientRequest(UMEvaluateRequest):
    outWrt: StrictInt = Field(description="Index of the output in the objective sens . F_outWrt.")
    inWrt: StrictInt = Field(description="Index of the input to differentiate with respect to.")
    sens: Vector = Field(description="Gradient of the objective w.r.t. output outWrt (its size).")


class UMApplyJacobianRequest(UMEvaluateRequest):
    outWrt: StrictInt = Field(description="Index of the output to differentiate.")
    inWrt: StrictInt = Field(description="Index of the input to differentiate with respect to.")
    vec: Vector = Field(description="Vector of the size of input inWrt.")


class UMApplyHessianRequest(UMEvaluateRequest):
    outWrt: StrictInt = Field(description="Index of the output in the objective sens . F_outWrt.")
    inWrt1: StrictInt = Field(description="Index of the first input (the result has its size).")
    inWrt2: StrictInt = Field(description="Index of the second input (vec has its size).")
    sens: Vector = Field(description="Weights of output outWrt (its size).")
    vec: Vector = Field(description="Vector of the size of input inWrt2.")


class UMInfoResponse(BaseModel):
    protocolVersion: float = Field(description="Always 1.0.")
    models: list[str] = Field(description="Models of the models file, then the generic `expression`.")


class UMSupport(BaseModel):
    Evaluate: bool
    Gradient: bool
    ApplyJacobian: bool
    ApplyHessian: bool


class UMModelInfoResponse(BaseModel):
    support: UMSupport


class UMInputSizesResponse(BaseModel):
    inputSizes: list[int]


class UMOutputSizesResponse(BaseModel):
    outputSizes: list[int]


class UMEvaluateResponse(BaseModel):
    output: list[Vector]


class UMVectorResponse(BaseModel):
    output: Vector


class UMErrorBody(BaseModel):
    type: ErrorType
    message: str


class UMErrorResponse(BaseModel):
    error: UMErrorBody
