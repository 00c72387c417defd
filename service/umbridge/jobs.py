"""The four UM-Bridge computations as GradientJobs, so they run as the same compiled tape programs.

For output F_j (flattened, of declared size m_j) and inputs x_1..x_k:

- Evaluate: the value of ``concatenate([F_1, ..., F_m])``, split by the declared sizes;
- Gradient (J^T sens): a vjp of F_j w.r.t. x_inWrt with cotangent ``sens``;
- ApplyJacobian (J vec): a jvp of F_j w.r.t. x_inWrt with tangent ``vec``;
- ApplyHessian: the Hessian-vector product of the scalar ``s = sum(sens * F_j)`` for the block
  (inWrt1, inWrt2): ``d/dx_inWrt2 (d s/dx_inWrt1) . vec``, of size of input inWrt1. The engine's hvp
  over wrt = [x_inWrt1, x_inWrt2] with tangents (0, vec) gives exactly that block times vec for
  x_inWrt1 (the Hessian is symmetric, so H_11 0 + H_12 vec).

Each output's text is wrapped as ``reshape((\\n<text>\\n), [m_j])``: the newlines end any trailing
comment, and the reshape makes an output whose size differs from its declaration fail when the
program is traced instead of being broadcast silently.
"""

from __future__ import annotations

import numpy as np

from service.jobs import GradientJob
from service.umbridge.spec import DTYPE, UMModel

__all__ = ["evaluate_job", "gradient_job", "hessian_action_job", "jacobian_action_job", "sens_name"]


def _flat(model: UMModel, out: int) -> str:
    return f"reshape((\n{model.output_expressions[out]}\n), [{model.output_sizes[out]}])"


def _variables(model: UMModel, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip(model.input_names, inputs, strict=True))


def _job(model: UMModel, expression: str, inputs: list[np.ndarray], **parts: object) -> GradientJob:
    return GradientJob(
        expression=expression,
        variables=_variables(model, inputs),
        constants=dict(model.constants),
        functions={name: dict(spec) for name, spec in model.functions.items()},
        dtype=DTYPE,
        **parts,  # type: ignore[arg-type]  # the derivative fields of GradientJob, by keyword
    )


def evaluate_job(model: UMModel, inputs: list[np.ndarray]) -> GradientJob:
    """Every output's value in one program: the concatenation of the flattened outputs."""
    if len(model.output_sizes) == 1:
        expression = _flat(model, 0)
    else:
        expression = (
            "concatenate([" + ", ".join(_flat(model, j) for j in range(len(model.output_sizes))) + "])"
        )
    return _job(model, expression, inputs, derivatives=())


def gradient_job(
    model: UMModel, out: int, inp: int, inputs: list[np.ndarray], sens: np.ndarray
) -> GradientJob:
    """J^T sens for output ``out`` and input ``inp`` (the result's ``vjp`` of that input)."""
    return _job(
        model, _flat(model, out), inputs, derivatives=("vjp",), wrt=(model.input_names[inp],), cotangent=sens
    )


def jacobian_action_job(
    model: UMModel, out: int, inp: int, inputs: list[np.ndarray], vec: np.ndarray
) -> GradientJob:
    """J vec for output ``out`` and input ``inp`` (the result's ``jvp``)."""
    name = model.input_names[inp]
    return _job(model, _flat(model, out), inputs, derivatives=("jvp",), wrt=(name,), tangents={name: vec})


def sens_name(model: UMModel) -> str:
    """A constant name for the sensitivities that no input, constant or function of the model uses."""
    taken = {*model.input_names, *model.constants, *model.functions}
    name = "sens"
    while name in taken:
        name += "_"
    return name


def hessian_action_job(
    model: UMModel,
    out: int,
    inp1: int,
    inp2: int,
    inputs: list[np.ndarray],
    sens: np.ndarray,
    vec: np.ndarray,
) -> GradientJob:
    """The (inWrt1, inWrt2) block of the Hessian of sens . F_out applied to vec (``hvp`` of input 1)."""
    first, second = model.input_names[inp1], model.input_names[inp2]
    weight = sens_name(model)
    expression = f"sum({weight} * {_flat(model, out)})"
    if first == second:
        wrt: tuple[str, ...] = (first,)
        tangents = {first: vec}
    else:
        wrt = (first, second)
        tangents = {first: np.zeros(model.input_sizes[inp1], dtype=DTYPE), second: vec}
    job = _job(model, expression, inputs, derivatives=("hvp",), wrt=wrt, tangents=tangents)
    job.constants[weight] = sens
    return job
