"""Dynamic batching in the engine: a stacked call gives exactly the per-request results."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from service.engine import execute, runner
from service.errors import EvaluationError, InvalidRequest, LimitExceeded
from service.jobs import GradientJob, GradientResult, StackedGradientJob
from service.limits import Limits
from tests.tolerances import CLOSED_FORM, EXACT, FLOAT32_CLOSED_FORM, STACKED, assert_close

ROSEN = "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)"


def stacked(jobs: list[GradientJob]) -> list[GradientResult]:
    results = execute(StackedGradientJob(jobs))
    assert isinstance(results, list)
    return results


def assert_same(a: Any, b: Any, what: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key], f"{what}/{key}")
    elif a is None:
        assert b is None
    else:
        assert_close(a, b, STACKED, what)


@pytest.mark.parametrize(
    ("derivatives", "extra"),
    [
        (("gradient",), {}),
        (("gradient", "hessian"), {}),
        (("jacobian", "vjp"), {"cotangent": True}),
        (("gradient", "hvp"), {"tangents": True}),
    ],
)
def test_each_stacked_result_equals_its_own_call(
    derivatives: tuple[str, ...], extra: dict[str, bool]
) -> None:
    rng = np.random.default_rng(len(derivatives))
    expression = ROSEN if "jacobian" not in derivatives else "x[1:] * w - x[:-1] ** 3"
    jobs = []
    for _ in range(5):
        x = rng.normal(size=10)
        jobs.append(
            GradientJob(
                expression,
                {"x": x},
                constants={"w": rng.normal(size=9)},  # differs per request: stacked too, never shared
                derivatives=derivatives,
                tangents={"x": rng.normal(size=10)} if extra.get("tangents") else {},
                cotangent=rng.normal(size=9) if extra.get("cotangent") else None,
                dtype="float64",
            )
        )
    for job, result in zip(jobs, stacked(jobs), strict=True):
        alone = execute(job)
        assert isinstance(alone, GradientResult)
        for field in ("value", "gradient", "jacobian", "hessian", "hvp", "vjp"):
            assert_same(getattr(result, field), getattr(alone, field), field)


def test_user_functions_with_custom_gradients_stack() -> None:
    functions = {
        "custom_relu": {"params": ["x"], "body": "maximum(0.0, x)", "gradient": {"x": "dy * (x > 0)"}}
    }
    jobs = [
        GradientJob("sum(custom_relu(x))", {"x": np.array(v, np.float32)}, functions=functions)
        for v in ([-2.0, 0.0, 2.0], [1.0, -1.0, 3.0])
    ]
    results = stacked(jobs)
    assert_close(results[0].gradient["x"], [0, 0, 1], EXACT, "gradient 0")  # type: ignore[index]
    assert_close(results[1].gradient["x"], [1, 0, 1], EXACT, "gradient 1")  # type: ignore[index]


def test_one_stacked_program_serves_any_number_of_requests() -> None:
    def jobs(n: int) -> list[GradientJob]:
        return [
            GradientJob("sum(sin(x) * k)", {"x": np.full(3, i, np.float32)}, {"k": np.float32(2)})
            for i in range(n)
        ]

    first, second = stacked(jobs(3)), stacked(jobs(17))
    assert len(second) == 17 and second[0].cache == "hit" and first[0].cache in ("hit", "miss")
    gradient = second[16].gradient["x"]  # type: ignore[index]
    assert_close(gradient, 2 * np.cos(np.full(3, 16.0)), FLOAT32_CLOSED_FORM, "gradient 16")


def test_stacks_must_share_one_signature_and_fit_the_cap() -> None:
    a = GradientJob("sum(x)", {"x": np.zeros(2)})
    b = GradientJob("sum(x)", {"x": np.zeros(3)})
    with pytest.raises(InvalidRequest):
        execute(StackedGradientJob([a, b]))
    with pytest.raises(InvalidRequest):
        execute(StackedGradientJob([]))


def test_a_bad_value_fails_the_stacked_call_as_a_user_error() -> None:
    # The API's batcher answers such a group one request at a time; here the engine only has to
    # fail the way a single call would.
    jobs = [
        GradientJob("sum(take(x, i))", {"x": np.ones(2)}, {"i": np.array([i], np.float64)}, dtype="float64")
        for i in (0.0, 7.0)
    ]
    with pytest.raises(EvaluationError):
        execute(StackedGradientJob(jobs))


def _traced_aside(key: str) -> None:
    """Wait (a condition, generous ceiling: tracing takes 0.2-0.5 s, far more on a loaded machine)."""
    deadline = time.monotonic() + 120
    while not runner._STACKING[key].done():
        assert time.monotonic() < deadline, "the stacked form was not traced within 120 s"
        time.sleep(0.01)


def test_a_warm_program_answers_a_stacked_job_at_once_while_its_stacked_form_is_traced_aside() -> None:
    jobs = [GradientJob("sum(x**3) + 0.25", {"x": np.full(4, i / 4)}, dtype="float64") for i in range(6)]
    for job in jobs[:3]:
        execute(job)  # the plain program is warm (and, after its second call, a numpy plan)
    key = "stacked|" + jobs[0].signature()
    first = stacked(jobs)
    # Not traced in line: the requests were answered one by one by the plain program meanwhile.
    assert key in runner._STACKING and {r.executor for r in first} == {"numpy"}
    _traced_aside(key)
    adopted, again = stacked(jobs), stacked(jobs)
    assert key not in runner._STACKING
    assert [r.cache for r in adopted] == ["miss"] * 6 and [r.cache for r in again] == ["hit"] * 6
    assert {r.executor for r in adopted} == {"tensorflow"}
    for i, results in enumerate(zip(first, adopted, again, strict=True)):
        for result in results:
            assert_close(result.gradient["x"], np.full(4, 3 * (i / 4) ** 2), CLOSED_FORM, f"gradient {i}")  # type: ignore[index]


def test_a_stacked_form_that_cannot_be_traced_aside_fails_the_next_stacked_job_as_before() -> None:
    # 10 x 1,000 elements per request fit the bound; stacked (the bound counts 1,024 requests) they do not.
    limits = Limits(max_tensor_elements=1_000_000)
    jobs = [
        GradientJob("sum(tile(x, [1000]))", {"x": np.full(10, float(i))}, dtype="float64") for i in range(3)
    ]
    for job in jobs:
        execute(job, limits)
    key = "stacked|" + jobs[0].signature()
    answers = execute(StackedGradientJob(jobs), limits)
    assert isinstance(answers, list) and all(a.gradient["x"][0] == 1000.0 for a in answers)  # type: ignore[index]
    _traced_aside(key)
    with pytest.raises(LimitExceeded):
        execute(StackedGradientJob(jobs), limits)
    assert key not in runner._STACKING
