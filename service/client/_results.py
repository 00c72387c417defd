"""Result types and pickers: the JSON of an answer as the objects the client's methods return.

Every parser here raises ``DecodingError`` for an answer that is not what the API sends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.client._exceptions import DecodingError
from service.client._wire import decode_map, decode_tensor_field

__all__ = [
    "ConstantInfo",
    "Derivatives",
    "FunctionInfo",
    "Functions",
    "Meta",
    "Readiness",
    "parse_liveness",
    "pick_derivatives",
    "pick_gradient",
    "pick_hessian",
    "pick_hvp",
    "pick_jacobian",
    "pick_jvp",
    "pick_value_and_grad",
    "pick_vjp",
    "same",
]


def _mapping(payload: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise DecodingError(f"the {what} response is not a JSON object")
    return payload


@dataclass(frozen=True)
class Meta:
    """How the server computed the answer."""

    cache: str  # "hit" when the compiled tape program was reused
    compute_ms: float  # time in the worker
    total_ms: float  # dispatch to result
    executor: str = "tensorflow"  # "numpy" when the server ran the program's checked numpy plan


@dataclass(frozen=True)
class Derivatives:
    """Everything ``POST /v1/gradient`` returned, as numpy arrays; what was not requested is None."""

    value: np.ndarray
    dtype: str
    meta: Meta
    gradient: dict[str, np.ndarray] | None = None
    jacobian: dict[str, np.ndarray] | None = None
    hessian: dict[str, dict[str, np.ndarray]] | None = None
    hvp: dict[str, np.ndarray] | None = None
    jvp: np.ndarray | None = None
    vjp: dict[str, np.ndarray] | None = None
    derivatives: list[np.ndarray] | None = field(default=None)  # with order k: d1..dk

    @classmethod
    def from_json(cls, payload: Any) -> Derivatives:
        body = _mapping(payload, "gradient")
        dtype = body.get("dtype")
        if dtype not in ("float32", "float64") or "value" not in body:
            raise DecodingError("the gradient response has no value or dtype")
        meta = body.get("meta") or {}
        try:
            parsed_meta = Meta(
                str(meta["cache"]),
                float(meta["compute_ms"]),
                float(meta["total_ms"]),
                str(meta.get("executor", "tensorflow")),
            )
        except (KeyError, TypeError, ValueError):
            raise DecodingError("the gradient response's meta is malformed") from None
        hessian = None
        if "hessian" in body:
            rows = _mapping(body["hessian"], "hessian")
            hessian = {a: decode_map(row, dtype, f"hessian.{a}") for a, row in rows.items()}
        higher = None
        if "derivative" in body:
            block = _mapping(body["derivative"], "derivative")
            listed = block.get("derivatives")
            if not isinstance(listed, list):
                raise DecodingError("the response's derivative.derivatives is not a list")
            higher = [
                decode_tensor_field(t, dtype, f"derivative.derivatives[{i}]") for i, t in enumerate(listed)
            ]

        def opt_map(name: str) -> dict[str, np.ndarray] | None:
            return decode_map(body[name], dtype, name) if name in body else None

        return cls(
            value=decode_tensor_field(body["value"], dtype, "value"),
            dtype=dtype,
            meta=parsed_meta,
            gradient=opt_map("gradient"),
            jacobian=opt_map("jacobian"),
            hessian=hessian,
            hvp=opt_map("hvp"),
            jvp=decode_tensor_field(body["jvp"], dtype, "jvp") if "jvp" in body else None,
            vjp=opt_map("vjp"),
            derivatives=higher,
        )


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


def parse_liveness(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, Mapping):
        raise DecodingError("the liveness response is malformed")
    return dict(payload)


# -- pickers: what each gradient method returns of the whole answer ------------------------------------


def pick_gradient(result: Derivatives) -> dict[str, np.ndarray]:
    return result.gradient or {}


def pick_value_and_grad(result: Derivatives) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    return result.value, result.gradient or {}


def pick_jacobian(result: Derivatives) -> dict[str, np.ndarray]:
    return result.jacobian or {}


def pick_hessian(result: Derivatives) -> dict[str, dict[str, np.ndarray]]:
    return result.hessian or {}


def pick_hvp(result: Derivatives) -> dict[str, np.ndarray]:
    return result.hvp or {}


def pick_jvp(result: Derivatives) -> np.ndarray:
    if result.jvp is None:
        raise DecodingError("the response has no jvp")
    return result.jvp


def pick_vjp(result: Derivatives) -> dict[str, np.ndarray]:
    return result.vjp or {}


def pick_derivatives(result: Derivatives) -> list[np.ndarray]:
    if result.derivatives is None:
        raise DecodingError("the response has no derivative")
    return result.derivatives


def same(result: Derivatives) -> Derivatives:
    return result
