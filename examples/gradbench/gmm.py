"""gmm: the log posterior of a Gaussian mixture with a Wishart prior, and its gradient.

The simplified form of GradBench's definition: per component the lower-triangular Q_k has
exp(q_k) on its diagonal and l_k below it, column by column; beta_ik = alpha_k + sum(q_k)
- |Q_k (x_i - mu_k)|**2 / 2, and the prior uses log Gamma_d (``multigammaln``). Q is assembled in
the service by gathering from [0, l_k]: the index pattern (which entry of l goes where) is the
only thing the client computes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from examples.gradbench import DTYPE, Evaluate
from service.client import Client

INDEPENDENT = ("alpha", "mu", "q", "l")


def lower_pattern(d: int) -> np.ndarray:
    """d x d positions into [0, l_1, l_2, ...]: 0 on and above the diagonal, l column by column below."""
    pattern = np.zeros((d, d), dtype=np.float64)
    position = 1
    for j in range(d):
        for i in range(j + 1, d):
            pattern[i, j] = position
            position += 1
    return pattern


def expression(d: int, k: int, n: int, m: int, gamma: float) -> str:
    dof = d + m + 1  # the Wishart prior's n
    log_norm = d / 2 * math.log(2 * math.pi)
    prior_constant = k * (dof * d * math.log(gamma / math.sqrt(2)))
    return f"""
    {prior_constant!r} - {k} * multigammaln({0.5 * dof!r}, {d})
    - {n} * ({log_norm!r} + logsumexp(alpha))
    + sum(logsumexp(alpha[None, :] + sum(q, axis=1)[None, :] - 0.5 * sum(
        einsum("kij,nkj->nki",
               reshape(gather(concatenate([zeros(({k}, 1)), l], axis=1), reshape(L, (-1,)), axis=1),
                       ({k}, {d}, {d})) + exp(q)[:, :, None] * eye({d}),
               x[:, None, :] - mu[None, :, :]) ** 2, axis=2), axis=1))
    - {0.5 * gamma * gamma!r} * (sum(exp(q) ** 2) + sum(l ** 2)) + {m} * sum(q)
    """


def _call(client: Client, input: Mapping[str, Any], derivatives: tuple[str, ...]) -> Any:
    d, k, n, m = (int(input[key]) for key in ("d", "k", "n", "m"))
    variables = {
        "alpha": np.asarray(input["alpha"], dtype=np.float64).reshape(k),
        "mu": np.asarray(input["mu"], dtype=np.float64).reshape(k, d),
        "q": np.asarray(input["q"], dtype=np.float64).reshape(k, d),
        "l": np.asarray(input["l"], dtype=np.float64).reshape(k, d * (d - 1) // 2),
    }
    constants = {"x": np.asarray(input["x"], dtype=np.float64).reshape(n, d), "L": lower_pattern(d)}
    text = expression(d, k, n, m, float(input["gamma"]))
    return client.compute(text, variables, constants=constants, derivatives=derivatives, dtype=DTYPE)


def objective(client: Client, input: Mapping[str, Any]) -> float:
    return float(_call(client, input, ()).value)


def jacobian(client: Client, input: Mapping[str, Any]) -> dict[str, Any]:
    gradient = _call(client, input, ("gradient",)).gradient
    return {name: gradient[name].tolist() for name in INDEPENDENT}


FUNCTIONS: Mapping[str, Evaluate] = {"objective": objective, "jacobian": jacobian}
