"""Gradient jobs: an expression, its inputs and the derivatives asked of it; their one validation.

``check_gradient_names`` needs only the names (the API calls it before decoding a tensor),
``check_gradient_arrays`` the decoded arrays; ``check_gradient_job`` is both, as the engine calls it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import InvalidRequest, LimitExceeded, ShapeError
from service.jobs.counts import counts_signature, loop_counts
from service.jobs.packing import packed
from service.limits import Limits

__all__ = [
    "DERIVATIVES",
    "DTYPES",
    "GradientJob",
    "GradientResult",
    "StackedGradientJob",
    "check_gradient_arrays",
    "check_gradient_job",
    "check_gradient_names",
]

DERIVATIVES = ("gradient", "jacobian", "hessian", "hvp", "jvp", "vjp")
DTYPES = ("float32", "float64")


@packed("variables", "constants", "tangents", "cotangent")
@dataclass(slots=True)
class GradientJob:
    """One forward evaluation of an expression and every derivative asked of it."""

    expression: str
    variables: dict[str, np.ndarray]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    # name -> {"params": [...], "body": str, "gradient": {param: str} | None}, in definition order
    functions: dict[str, dict[str, Any]] = field(default_factory=dict)
    derivatives: tuple[str, ...] = ("gradient",)
    wrt: tuple[str, ...] | None = None  # None: every variable
    tangents: dict[str, np.ndarray] = field(default_factory=dict)
    cotangent: np.ndarray | None = None
    order: int | None = None  # k-th derivative of a scalar expression w.r.t. one variable
    batch: bool = False
    dtype: str = "float32"
    # constants used as loop step counts (fori(n, ...)): their values are part of the program
    counts: tuple[str, ...] = ()

    def signature(self) -> str:
        """What the compiled program depends on: text, shapes, dtypes, the derivative set and the
        values of the constants used as loop counts."""

        def shapes(arrays: dict[str, np.ndarray]) -> str:
            return ",".join(f"{k}{list(v.shape)}" for k, v in arrays.items())

        return "|".join(
            [
                self.expression,
                repr(list(self.functions.items())),
                shapes(self.variables),
                shapes(self.constants),
                ",".join(sorted(self.derivatives)),
                ",".join(self.wrt) if self.wrt is not None else "*",
                shapes(self.tangents),
                "-" if self.cotangent is None else str(list(self.cotangent.shape)),
                str(self.order),
                str(self.batch),
                self.dtype,
                counts_signature(self.constants, self.counts),
            ]
        )


@packed("value", "gradient", "jacobian", "hvp", "vjp", "jvp", "hessian", "higher")
@dataclass(slots=True)
class GradientResult:
    value: np.ndarray
    gradient: dict[str, np.ndarray] | None = None
    jacobian: dict[str, np.ndarray] | None = None
    hessian: dict[str, dict[str, np.ndarray]] | None = None
    hvp: dict[str, np.ndarray] | None = None
    jvp: np.ndarray | None = None
    vjp: dict[str, np.ndarray] | None = None
    # `order` k: derivatives[i] is the (i+1)-th derivative tensor, shape var.shape * (i+1)
    higher: dict[str, Any] | None = None
    cache: str = "miss"  # "hit" | "miss": whether the compiled program was already cached
    compute_ms: float = 0.0
    executor: str = "tensorflow"  # "tensorflow" | "numpy": who ran the traced graph (engine/plan.py)


@dataclass(slots=True)
class StackedGradientJob:
    """Several GradientJobs of one signature, run as one vectorized call (dynamic batching).

    The worker answers with a list of GradientResults, one per job, in order.
    """

    jobs: list[GradientJob]

    def signature(self) -> str:
        return "stacked|" + self.jobs[0].signature()


# --- the one validation of a gradient job


def _unique(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def check_gradient_names(
    *,
    derivatives: Sequence[str],
    variables: Sequence[str],
    constants: Collection[str],
    wrt: Sequence[str] | None,
    tangents: Collection[str] | None,
    cotangent: bool,
    order: int | None,
    dtype: str,
    limits: Limits,
    refuse_unused: bool = True,
) -> tuple[str, ...]:
    """What can be refused from names alone; returns wrt (every variable when None), duplicates dropped.

    ``tangents`` None: none given ("tangents" is the field a refusal names); a collection: the
    names given (a missing one is named, ``tangents.<name>``). ``refuse_unused`` also refuses
    inputs no requested derivative uses (tangents outside wrt or without hvp/jvp, a cotangent
    without vjp): likely mistakes in a request, which the engine merely ignores.
    """
    if dtype not in DTYPES:
        raise InvalidRequest(f"dtype must be 'float32' or 'float64', got {dtype!r}", field="dtype")
    unknown = set(derivatives) - set(DERIVATIVES)
    if unknown:
        raise InvalidRequest(
            f"unknown derivative(s) {sorted(unknown)}; allowed: {', '.join(DERIVATIVES)}", field="derivatives"
        )
    if wrt is not None:
        names = _unique(wrt)
        for name in names:
            if name not in variables:
                hint = " (constants are not differentiated)" if name in constants else ""
                raise InvalidRequest(
                    f"wrt names {name!r}, which is not a variable{hint}; "
                    f"variables: {', '.join(variables) or 'none'}",
                    field="wrt",
                )
    else:
        names = tuple(variables)
    wants_tangents = [d for d in _unique(derivatives) if d in ("hvp", "jvp")]
    if wants_tangents:
        given = tangents or ()
        missing = [name for name in names if name not in given]
        if missing:
            raise InvalidRequest(
                f"{' and '.join(wants_tangents)} need tangents for every wrt variable; "
                f"missing: {', '.join(missing)}",
                field="tangents" if tangents is None else f"tangents.{missing[0]}",
            )
        extra = [name for name in given if name not in names]
        if extra and refuse_unused:
            raise InvalidRequest(
                f"tangents given for {', '.join(extra)}, which {'is' if len(extra) == 1 else 'are'} "
                "not in wrt",
                field=f"tangents.{extra[0]}",
            )
    elif tangents and refuse_unused:
        raise InvalidRequest(
            "tangents are only used by hvp and jvp, and neither was requested", field="tangents"
        )
    if "vjp" in derivatives and not cotangent:
        raise InvalidRequest("vjp needs a cotangent (a tensor of the value's shape)", field="cotangent")
    if "vjp" not in derivatives and cotangent and refuse_unused:
        raise InvalidRequest("cotangent is only used by vjp, which was not requested", field="cotangent")
    if order is not None:
        if len(names) != 1:
            raise InvalidRequest(
                f"order needs exactly one variable to differentiate (give wrt: [name]); got {len(names)}",
                field="wrt" if wrt is not None else "order",
            )
        if order > limits.max_order:
            raise LimitExceeded(
                f"order {order} asked; at most {limits.max_order} is allowed",
                limit="max_order",
                allowed=limits.max_order,
                field="order",
            )
        if order < 1:
            raise InvalidRequest(f"order must be at least 1, not {order}", field="order")
    return names


def check_gradient_arrays(
    variables: Mapping[str, np.ndarray], tangents: Mapping[str, np.ndarray], *, batch: bool, limits: Limits
) -> int:
    """Batch axes and tangent shapes; returns the batch size (1 without batch)."""
    size = _check_batch(batch, variables, limits)
    for name, tangent in tangents.items():
        if name in variables and tangent.shape != variables[name].shape:
            raise ShapeError(
                f"tangents.{name} has shape {list(tangent.shape)} but variable {name} has shape "
                f"{list(variables[name].shape)}",
                field=f"tangents.{name}",
            )
    return size


def check_gradient_job(job: GradientJob, limits: Limits) -> tuple[str, ...]:
    """Both checks on a whole job (the engine's defence in depth; unused inputs pass); returns wrt."""
    wrt = check_gradient_names(
        derivatives=job.derivatives,
        variables=list(job.variables),
        constants=job.constants,
        wrt=job.wrt,
        tangents=job.tangents,
        cotangent=job.cotangent is not None,
        order=job.order,
        dtype=job.dtype,
        limits=limits,
        refuse_unused=False,
    )
    check_gradient_arrays(job.variables, job.tangents, batch=job.batch, limits=limits)
    loop_counts(job.constants, job.counts)
    return wrt


def _check_batch(batch: bool, variables: Mapping[str, np.ndarray], limits: Limits) -> int:
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
