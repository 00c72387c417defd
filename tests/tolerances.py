"""How close is close enough: the one tolerance policy of every engine-vs-reference test.

A test that compares what tapeserve computed with an independent reference names one of the
tolerances below instead of writing its own ``rtol``: the name says what is compared, the ``why``
says where the difference comes from and so why the bound is what it is. A test that needs a
looser bound than its category adds a new named entry here, with its reason, rather than a bare
number at the call site.

Arithmetic facts the reasons rely on: a float64 rounding is at most 1.1e-16 relative and a
float32 one 6e-8; TensorFlow's Grappler (arithmetic optimizer, constant folding) and Eigen's
vectorized reductions may reorder sums and products, so two correct programs of the same formula
agree to a few ulps per operation, not bit for bit.

    EXACT                   same computation, values moved losslessly (wire forms, caches)
    CLOSED_FORM             float64 engine result vs the formula evaluated with numpy
    DERIVED_CHAIN           float64 results of longer op chains (HVP, JVP, order k, Jacobian rows)
    PLAN                    a numpy plan vs the TensorFlow program it was traced from (float64)
    PLAN_FLOAT32            the same in float32
    FINITE_DIFFERENCE       float64 engine result vs float64 central finite differences
    FD_FLOAT32_MODEL        float32 model derivatives vs float64 finite differences of the model
    KERAS_FLOAT32           float32 engine training/gradient vs in-process Keras float32
    KERAS_FLOAT32_FORWARD   one float32 forward pass (a loss) vs Keras' forward pass
    ILL_CONDITIONED_ADAM    Adam vs Keras where a gradient is exactly 0 (documents the bad case)
    FLOAT32_CLOSED_FORM     a float32 engine result vs the formula evaluated in float64
    STENCIL_REFERENCE       float64 value vs a reference that is itself a 5-point stencil (digamma)
    SECOND_FINITE_DIFFERENCE  float64 Hessian actions vs differences of differences
    STACKED                 a stacked call (requests batched into one program) vs each request alone
    PLAN_FEW_OPS            a numpy plan vs TensorFlow on hand-written programs of a few ops (float64)
    PLAN_ONE_KERNEL         one numpy kernel of a plan vs TensorFlow's kernel (float64)
    FLOAT32_LEARNING_RATE   float64 training vs numpy, where Keras keeps the learning rate in float32
    CONVERGED               where an optimizer run ends vs the known optimum it converges to
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest


@dataclass(frozen=True)
class Tolerance:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise (numpy's rule), and why."""

    rtol: float
    atol: float
    why: str

    def scaled(self, *arrays: Any) -> Tolerance:
        """The same relative bound, with ``atol`` grown to ``rtol`` times the largest magnitude.

        For results whose entries cancel to near zero while their neighbours are large (Hessian
        off-diagonals, gradients at a minimum): the rounding error of such an entry is relative to
        the magnitude of the terms that cancelled, not to its own (tiny) value.
        """
        largest = max([1.0, *(float(np.max(np.abs(np.asarray(a, np.float64)), initial=0.0)) for a in arrays)])
        return replace(self, atol=max(self.atol, self.rtol * largest))

    def widened(self, atol: float) -> Tolerance:
        """The same bound plus an absolute slack, e.g. a finite-difference reference's own error."""
        return replace(self, atol=self.atol + atol)


EXACT = Tolerance(
    0.0,
    0.0,
    "The same values on both sides: float32/float64 survive JSON (shortest repr round-trips) and "
    "base64 bit for bit, and a cached program runs the same kernels on the same inputs.",
)
CLOSED_FORM = Tolerance(
    1e-12,
    1e-12,
    "float64 TensorFlow vs the closed form in numpy: a handful of roundings (1.1e-16 each) on each "
    "side, reordered by Grappler; 1e-12 leaves 3-4 digits of room and still catches any wrong term. "
    "The absolute 1e-12 is for entries that are zero in exact arithmetic (e.g. Hessian off-diagonals).",
)
DERIVED_CHAIN = Tolerance(
    1e-10,
    1e-12,
    "float64 results built from longer chains of ops (forward-over-reverse HVPs, JVPs, nested tapes of "
    "order k, vectorized Jacobian rows): each level of nesting multiplies the roundings and sums "
    "terms of opposite sign, so a few hundred ulps of the largest term; 1e-10 is far below any error "
    "of a wrong rule (>= 1e-3 relative).",
)
PLAN = Tolerance(
    1e-11,
    1e-11,
    "A numpy plan runs the traced graph's ops with numpy kernels whose summation order differs from "
    "Eigen's vectorized one; on float64 that is ulps per reduction. The plan is adopted only at 1e-9 "
    "(service/engine/plan.py), so 1e-11 on test inputs is stricter than adoption.",
)
PLAN_FLOAT32 = Tolerance(
    1e-5,
    1e-5,
    "The same in float32 (6e-8 per rounding): reductions over a few hundred terms drift ~1e-6; the "
    "plan's adoption check allows 1e-4.",
)
FINITE_DIFFERENCE = Tolerance(
    1e-6,
    1e-9,
    "Exact float64 derivatives vs central differences with step ~1e-5..1e-4: truncation error "
    "h^2 f'''/6 ~ 1e-9 relative and rounding eps*|f|/h ~ 1e-11, so 1e-6 is a thousandfold margin on "
    "smooth test functions, while a wrong derivative rule is off by O(1).",
)
FD_FLOAT32_MODEL = Tolerance(
    1e-5,
    1e-7,
    "float32 model derivatives (HVPs, UM-Bridge gradients of float32 models) vs float64 finite "
    "differences: the float32 forward pass itself is only good to ~1e-7 relative per op, so the "
    "derivative carries ~1e-6; 1e-5 is ten times that.",
)
KERAS_FLOAT32 = Tolerance(
    1e-5,
    1e-6,
    "float32 training or model gradients vs in-process Keras on a well-conditioned problem: the same "
    "math traced into different graphs (Grappler fuses and reorders), a few float32 ulps (6e-8) per op, "
    "carried through a few optimizer steps; 1e-5 ~ 150 ulps. Adam divides by sqrt(v)+1e-7, so a "
    "gradient that is zero in exact arithmetic turns rounding noise into a learning-rate-sized move: "
    "fixtures must not have such parameters (tests/models/test_fast_training.py shows the case).",
)

KERAS_FLOAT32_FORWARD = Tolerance(
    1e-6,
    0.0,
    "One float32 forward pass (a loss) vs Keras' own forward pass of the same weights: no optimizer "
    "steps to carry the difference, so only the reordering of a few reductions (~10 ulps).",
)
ILL_CONDITIONED_ADAM = Tolerance(
    1e-3,
    1e-3,
    "Adam on a parameter whose exact gradient is 0 (a bias that BatchNorm cancels): both sides see "
    "rounding noise (~1e-7) in that gradient, Adam's first step divides it by its own size "
    "(sqrt(v) + 1e-7), so the parameter moves by a noise-decided fraction of the learning rate (0.05) "
    "and the difference reaches the other weights through the relu. Measured on this fixture: 2.2e-4 "
    "absolute on that bias and 7e-4 relative elsewhere after 4 steps. Only the documenting test uses it.",
)


FLOAT32_CLOSED_FORM = Tolerance(
    1e-6,
    1e-7,
    "A float32 engine result (a gradient, a loss, a regularization sum) vs the formula evaluated in "
    "float64 from the same float32 inputs: the float32 side rounds at 6e-8 per op, and its few ops "
    "(a sin/cos kernel, a sum of tens of terms, the mix of two losses) reach a few 1e-7; 1e-6 is ~16 "
    "ulps (measured: 2e-8). The absolute 1e-7 is for entries that are zero in exact arithmetic.",
)
STENCIL_REFERENCE = Tolerance(
    1e-10,
    1e-10,
    "A float64 value vs a reference that is itself a finite difference: numpy and math have no "
    "digamma, so its reference is a 5-point stencil of math.lgamma (h = 1e-3) whose truncation "
    "h^4 psi^(5) / 30 grows near the poles (measured 4.4e-11 at the test's points, 44 times CLOSED_FORM). "
    "A wrong kernel is off by far more than 1e-10.",
)
SECOND_FINITE_DIFFERENCE = Tolerance(
    1e-5,
    1e-6,
    "float64 Hessian actions vs central differences of central differences (step 1e-4 on both "
    "levels, the UM-Bridge ApplyHessian reference): truncation ~h^2 is 1e-8 relative, but rounding is "
    "eps * |f| / h^2 ~ 1e-8 * |f| absolute, 1.8e-7 measured on the arm model (|f| ~ 40) where the exact "
    "entry is 0; 1e-6 absolute and 1e-5 relative keep a fivefold margin over that, and a wrong "
    "second-derivative rule is off by O(1).",
)
STACKED = Tolerance(
    1e-12,
    1e-12,
    "A stacked call (requests of one signature batched along a new leading axis into one program) vs "
    "each request run alone, in float64: the same ops, but the batched kernels (matmuls, reductions "
    "over the request axis) may sum in another order, so a few ulps per reduction; 1e-12 leaves 3-4 "
    "digits of room, and a request mixed up with its neighbour is off by O(1).",
)
PLAN_FEW_OPS = Tolerance(
    1e-12,
    1e-12,
    "A numpy plan vs the TensorFlow program it was traced from, on the hand-written programs of "
    "tests/engine/test_plan.py (a few ops per output, fixed inputs, float64): only a few reductions "
    "can be reordered, so they agree to a few ulps; kept at 1e-12, ten times tighter than PLAN, which "
    "covers the deeper generated expressions.",
)
PLAN_ONE_KERNEL = Tolerance(
    1e-13,
    1e-13,
    "One numpy kernel of a plan (a matmul with transposes, a reduction over a few elements) vs "
    "TensorFlow's kernel on the same float64 inputs: sums of at most a dozen terms in another order, "
    "so an ulp or two per sum; 1e-13 is ~450 ulps, and a transposed operand is off by O(1).",
)
FLOAT32_LEARNING_RATE = Tolerance(
    1e-7,
    1e-12,
    "float64 training vs the step written in numpy: Keras keeps the learning rate in a float32 "
    "variable even in float64, so 0.1 is off by 1.5e-8 relative and so is the step lr * g; 1e-7 is "
    "that with a sixfold margin, while a wrong gradient or learning rate is off by O(1).",
)
CONVERGED = Tolerance(
    0.0,
    1e-3,
    "Where an optimizer run ends vs the known optimum it converges to (Rosenbrock's (1, 1), the "
    "generating weights of noiseless linear data): not a rounding bound but one of convergence. "
    "Measured: 8e-9 after 3000 Adam steps in float64 (tests/api/test_step_api.py), 4e-7 after 200 SGD "
    "steps in float32 (tests/cli/test_client_commands.py); 1e-3 tells 'converged' from 'did not train' "
    "and leaves room for a change of seed, initializer or step count.",
)


def assert_close(actual: Any, expected: Any, tolerance: Tolerance, what: str = "") -> None:
    """Shapes equal, then numpy's elementwise rule with this tolerance."""
    expected_array = np.asarray(expected, np.float64)
    actual_array = np.asarray(actual, np.float64)
    assert actual_array.shape == expected_array.shape, (
        f"{what}: shape {actual_array.shape} != {expected_array.shape}"
    )
    np.testing.assert_allclose(
        actual_array, expected_array, rtol=tolerance.rtol, atol=tolerance.atol, err_msg=what
    )


def approx(expected: Any, tolerance: Tolerance) -> Any:
    """``pytest.approx`` with this tolerance, for scalars and lists in plain asserts."""
    return pytest.approx(expected, rel=tolerance.rtol, abs=tolerance.atol)
