"""Wire schemas (pydantic v2): what the HTTP API accepts and returns, and nothing else.

Tensors are kept as the raw JSON values here (cheap to validate even at a million elements);
``service.tensorcodec`` turns them into numpy arrays with precise errors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from service.limits import MIN_TIMEOUT_S

__all__ = [
    "ConstantInfo",
    "Derivative",
    "FunctionInfo",
    "FunctionsResponse",
    "GradientMeta",
    "GradientRequest",
    "GradientResponse",
    "HigherDerivative",
    "Liveness",
    "Problem",
    "Readiness",
    "TENSOR_COMPONENTS",
    "Tensor",
    "UserFunction",
    "WireFloat",
]

_NONFINITE = {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}
# Named schemas the API's OpenAPI document adds to its components (they refer to each other).
TENSOR_COMPONENTS: dict[str, dict[str, Any]] = {
    "Tensor": {
        "title": "Tensor",
        "description": (
            "A number, or row-major nested arrays of numbers; non-finite values are the strings "
            '"NaN", "Infinity" and "-Infinity" (strict JSON). Or a Base64Tensor.'
        ),
        "anyOf": [
            {"type": "number"},
            _NONFINITE,
            {"$ref": "#/components/schemas/NestedNumbers"},
            {"$ref": "#/components/schemas/Base64Tensor"},
        ],
    },
    "NestedNumbers": {
        "title": "NestedNumbers",
        "description": "Row-major nested arrays of equal lengths at each level.",
        "type": "array",
        "items": {"anyOf": [{"type": "number"}, _NONFINITE, {"$ref": "#/components/schemas/NestedNumbers"}]},
    },
    "Base64Tensor": {
        "title": "Base64Tensor",
        "description": "The little-endian bytes of a row-major array, base64-encoded.",
        "type": "object",
        "required": ["dtype", "shape", "b64"],
        "additionalProperties": False,
        "properties": {
            "dtype": {"type": "string", "enum": ["float16", "float32", "float64", "int32", "int64", "bool"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "b64": {"type": "string", "contentEncoding": "base64"},
        },
    },
}

# A scalar float of a response: a JSON number, or one of the strings for NaN and the infinities (the
# tensors' rule; ``service.api.wire`` renders every response by it).
WireFloat = Annotated[
    float,
    WithJsonSchema(
        {
            "anyOf": [{"type": "number"}, _NONFINITE],
            "description": 'A number; non-finite values are the strings "NaN", "Infinity", "-Infinity".',
        }
    ),
]

# allOf: a bare $ref next to a description makes pydantic look the name up in its own definitions.
Tensor = Annotated[Any, WithJsonSchema({"allOf": [{"$ref": "#/components/schemas/Tensor"}]})]
Derivative = Literal["gradient", "jacobian", "hessian", "hvp", "jvp", "vjp"]

_ROSENBROCK_EXAMPLE: dict[str, Any] = {
    "expression": "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)",
    "variables": {"x": [1.5, -0.5, 2.0]},
    "derivatives": ["gradient", "hessian"],
    "dtype": "float64",
}


def _default_derivatives() -> list[Derivative]:
    return ["gradient"]


class UserFunction(BaseModel):
    """A function the request defines, optionally with its own gradient (tf.custom_gradient)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    params: list[str] = Field(default_factory=list, description="Parameter names.")
    body: str = Field(description="Expression over the parameters, e.g. maximum(0.0, x).")
    gradient: dict[str, str] | None = Field(
        None,
        description=(
            "Per parameter, the expression of its gradient; it sees the parameters, y (the output) "
            'and dy (the upstream gradient), e.g. {"x": "dy * (x > 0)"}.'
        ),
    )
    doc: str | None = Field(None, description="Free text; ignored by the service.")


class GradientRequest(BaseModel):
    """One expression, its inputs, and the derivatives wanted from one forward evaluation."""

    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [_ROSENBROCK_EXAMPLE]}
    )

    expression: str = Field(min_length=1, description="The expression; see GET /v1/functions.")
    variables: dict[str, Tensor] = Field(default_factory=dict, description="Inputs that are differentiated.")
    constants: dict[str, Tensor] = Field(
        default_factory=dict, description="Inputs that are not differentiated."
    )
    functions: dict[str, UserFunction] = Field(
        default_factory=dict, description="User functions; each may call those defined before it."
    )
    derivatives: list[Derivative] = Field(
        default_factory=_default_derivatives,
        description="Derivatives to return; the value is always returned.",
    )
    wrt: list[str] | None = Field(
        None, description="Variables to differentiate with respect to (default: all)."
    )
    tangents: dict[str, Tensor] | None = Field(
        None, description="For hvp and jvp: one tensor per wrt variable, of that variable's shape."
    )
    cotangent: Tensor | None = Field(None, description="For vjp: a tensor of the value's shape.")
    order: int | None = Field(
        None,
        ge=1,
        description=(
            "k: also return the 1st..k-th derivative tensors of a scalar expression with respect to "
            "its single wrt variable (field `derivative`)."
        ),
    )
    batch: bool = Field(
        False, description="The leading axis of every variable is a batch of independent points."
    )
    dtype: Literal["float32", "float64"] = Field("float32", description="Computation dtype.")
    encoding: Literal["json", "base64"] = Field("json", description="Tensor form in the response.")
    timeout_s: float | None = Field(
        None,
        ge=MIN_TIMEOUT_S,
        description="How long this request waits for its answer, seconds (at least 0.1, at most the server's "
        "request_timeout_s). Past it the answer is 504; the job itself may go on in its worker (up to "
        "worker_kill_after_s) so that a retry finds its program compiled.",
    )


class HigherDerivative(BaseModel):
    """The answer to `order`: derivatives[i] is the (i+1)-th derivative, of shape var.shape * (i+1)."""

    variable: str
    order: int
    derivatives: list[Tensor]


class GradientMeta(BaseModel):
    cache: Literal["hit", "miss"] = Field(description="Whether the compiled tape program was already cached.")
    compute_ms: float = Field(description="Time the worker spent computing.")
    total_ms: float = Field(description="Time from dispatch to the worker until its result came back.")
    executor: Literal["tensorflow", "numpy"] = Field(
        "tensorflow",
        description="Who ran the traced graph: TensorFlow's runtime, or (for a small program seen before) "
        "its numpy plan, checked against TensorFlow when it was built.",
    )


class GradientResponse(BaseModel):
    """The value and the requested derivatives; a derivative that was not requested is absent."""

    value: Tensor
    gradient: dict[str, Tensor] | None = Field(
        None, description="Per wrt variable, the gradient of the sum of the value (TF semantics)."
    )
    jacobian: dict[str, Tensor] | None = Field(
        None, description="Per variable, shape value.shape + var.shape."
    )
    hessian: dict[str, dict[str, Tensor]] | None = Field(
        None, description="hessian[a][b] has shape a.shape + b.shape (scalar expressions only)."
    )
    hvp: dict[str, Tensor] | None = Field(None, description="Hessian-vector product with the tangents.")
    jvp: Tensor | None = Field(
        None, description="Jacobian-vector product with the tangents (the value's shape)."
    )
    vjp: dict[str, Tensor] | None = Field(None, description="Vector-Jacobian product with the cotangent.")
    derivative: HigherDerivative | None = Field(None, description="Present when `order` was given.")
    dtype: Literal["float32", "float64"]
    meta: GradientMeta


class FunctionInfo(BaseModel):
    name: str
    signature: str
    category: str
    doc: str


class ConstantInfo(BaseModel):
    name: str
    value: float | str = Field(description='The value ("Infinity" for inf).')


class FunctionsResponse(BaseModel):
    """The expression language: built-in functions, constants and a syntax summary."""

    functions: list[FunctionInfo]
    constants: list[ConstantInfo]
    syntax: list[str]


class Liveness(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "starting"]
    pool: dict[str, Any] = Field(description="The worker pool's status: workers, queue depth, in flight.")
    batching: dict[str, int] = Field(
        default_factory=dict,
        description="Dynamic batching so far: stacked calls and the requests they carried.",
    )


class Problem(BaseModel):
    """An RFC 9457 problem; members beyond these (line, column, snippet, field, limit...) vary by code."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str
    request_id: str | None = Field(None, description="The request's id, as in the X-Request-ID header.")
