"""What each public method of ``Client`` and ``AsyncClient`` sends: its signature, docstring and ``Call``.

The sans-IO half of the clients. A method here takes exactly the arguments of the client method of
the same name (the clients' methods are made from these, ``_client.py``) and returns the ``Call``
to send: method, path, JSON body and the parser of the answer. Nothing here does I/O or knows
whether the caller waits synchronously or awaits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from numpy.typing import ArrayLike

from service.client._builder import Expr
from service.client._models import (
    ModelDescription,
    ModelGradient,
    StepResult,
    TrainResult,
    describe_call,
    model_gradient_call,
    step_call,
    train_call,
)
from service.client._requests import Call, TrainStream, gradient_call, merge_variables
from service.client._results import (
    Derivatives,
    Functions,
    Readiness,
    parse_liveness,
    pick_derivatives,
    pick_gradient,
    pick_hessian,
    pick_hvp,
    pick_jacobian,
    pick_jvp,
    pick_value_and_grad,
    pick_vjp,
    same,
)
from service.client._wire import TensorCodec

__all__ = ["Endpoints"]

T = TypeVar("T")


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


class Endpoints:
    """One method per client method, returning the ``Call`` it sends; tensors are written by ``codec``."""

    def __init__(self, codec: TensorCodec) -> None:
        self.codec = codec

    def _gradient(
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
    ) -> Call[Derivatives]:
        """Everything ``POST /v1/gradient`` can return in one call: the value and ``derivatives``."""
        return self._gradient(
            expression,
            variables,
            kw_variables,
            derivatives,
            same,
            tangents=tangents,
            cotangent=cotangent,
            order=order,
            **_options(constants, functions, wrt, batch, dtype, timeout_s),
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
    ) -> Call[dict[str, np.ndarray]]:
        """The gradient of the sum of the expression, per variable: ``gradient("sum(x**2)", x=[1, 2])``."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        return self._gradient(expression, variables, kw_variables, ["gradient"], pick_gradient, **options)

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
    ) -> Call[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """The value and the gradient (per variable) from one evaluation."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        return self._gradient(
            expression, variables, kw_variables, ["gradient"], pick_value_and_grad, **options
        )

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
    ) -> Call[dict[str, np.ndarray]]:
        """Per variable, the Jacobian of shape ``value.shape + var.shape``."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        return self._gradient(expression, variables, kw_variables, ["jacobian"], pick_jacobian, **options)

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
    ) -> Call[dict[str, dict[str, np.ndarray]]]:
        """The Hessian blocks of a scalar expression: ``result[a][b]`` has shape ``a.shape + b.shape``."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        return self._gradient(expression, variables, kw_variables, ["hessian"], pick_hessian, **options)

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
    ) -> Call[dict[str, np.ndarray]]:
        """The Hessian-vector product with ``tangents`` (one per wrt variable), per variable."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        return self._gradient(
            expression, variables, kw_variables, ["hvp"], pick_hvp, tangents=tangents, **options
        )

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
    ) -> Call[np.ndarray]:
        """The Jacobian-vector product with ``tangents``: an array of the value's shape."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        return self._gradient(
            expression, variables, kw_variables, ["jvp"], pick_jvp, tangents=tangents, **options
        )

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
    ) -> Call[dict[str, np.ndarray]]:
        """The vector-Jacobian product with ``cotangent`` (of the value's shape), per variable."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        return self._gradient(
            expression, variables, kw_variables, ["vjp"], pick_vjp, cotangent=cotangent, **options
        )

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
    ) -> Call[list[np.ndarray]]:
        """The 1st..``order``-th derivatives of a scalar expression w.r.t. its one (wrt) variable."""
        options = _options(constants, functions, wrt, batch, dtype, timeout_s)
        return self._gradient(
            expression, variables, kw_variables, [], pick_derivatives, order=order, **options
        )

    # -- the language and health ----------------------------------------------------------------------

    def functions(self) -> Call[Functions]:
        """The built-in functions, constants and syntax of the expression language."""
        return Call("GET", "/v1/functions", None, Functions.from_json)

    def health(self) -> Call[dict[str, Any]]:
        """Liveness (``GET /healthz``): ``{"status": "ok"}`` while the API process runs."""
        return Call("GET", "/healthz", None, parse_liveness)

    def ready(self) -> Call[Readiness]:
        """Readiness (``GET /readyz``); not ready is an answer (``ready=False``), not an error."""
        return Call("GET", "/readyz", None, Readiness.from_json, accept=(200, 503))

    # -- models and optimizer steps (POST /v1/model/*, /v1/step) --------------------------------------

    def describe_model(
        self, model: Mapping[str, Any], *, optimizer: str | Mapping[str, Any] | None = None
    ) -> Call[ModelDescription]:
        """A model spec's weights (get_weights() order), parameter counts and shapes."""
        return describe_call(model, optimizer)

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
    ) -> Call[ModelGradient]:
        """Loss and gradients w.r.t. the weights and/or inputs (``wrt``), hvp, saliency, adversarial x."""
        return model_gradient_call(
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
    ) -> Call[ModelGradient]:
        """Adversarial examples (FGSM or PGD from the input gradient): ``.x_adv``, ``.adversarial_loss``."""
        attack = {"method": method, "epsilon": epsilon, "steps": steps, "step_size": step_size}
        attack.update(clip_min=clip_min, clip_max=clip_max)
        return model_gradient_call(
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
    ) -> Call[TrainResult]:
        """``steps`` clipped optimizer steps in one call; feed ``weights`` and ``optimizer_state`` back."""
        return train_call(
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
    ) -> TrainStream:
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
        return TrainStream(call, dtype or "float32")

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
    ) -> Call[StepResult]:
        """``steps`` optimizer steps minimizing a scalar expression; returns the new variables."""
        return step_call(
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
