"""Every client method against a real server (`tapeserve serve`, one worker), checked against closed
forms and numpy references; errors the server really sends mapped to their classes; base64 switching."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

import service.client as ts
from service.api.settings import Settings
from tests.conftest import LiveServer
from tests.tolerances import (
    CLOSED_FORM,
    DERIVED_CHAIN,
    EXACT,
    FLOAT32_LEARNING_RATE,
    approx,
    assert_close,
)

ROSEN = "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)"
X0 = np.array([1.5, -0.5, 2.0])


def rosen_grad(x: np.ndarray) -> np.ndarray:
    g = np.zeros_like(x)
    g[:-1] += -400 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2 * (1 - x[:-1])
    g[1:] += 200 * (x[1:] - x[:-1] ** 2)
    return g


def rosen_hess(x: np.ndarray) -> np.ndarray:
    n = len(x)
    h = np.zeros((n, n))
    for i in range(n - 1):
        h[i, i] += 1200 * x[i] ** 2 - 400 * x[i + 1] + 2
        h[i, i + 1] += -400 * x[i]
        h[i + 1, i] += -400 * x[i]
        h[i + 1, i + 1] += 200
    return h


class RecordingTransport(httpx.HTTPTransport):
    """A real HTTP transport that keeps each request body and response content type."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, object]] = []
        self.response_bodies: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.content:
            self.bodies.append(json.loads(request.content))
        response = super().handle_request(request)
        response.read()
        self.response_bodies.append(response.content)
        return response


@pytest.fixture(scope="module")
def client(ready_server: LiveServer) -> Iterator[ts.Client]:
    with ts.Client(ready_server.url, retry=ts.Retry(attempts=0)) as c:
        yield c


# -- expression methods ------------------------------------------------------------------------------


def test_gradient_value_and_grad_and_compute(client: ts.Client) -> None:
    grads = client.gradient(ROSEN, x=X0, dtype="float64")
    assert_close(grads["x"], rosen_grad(X0), CLOSED_FORM, "gradient")
    value, grads = client.value_and_grad(ROSEN, {"x": X0}, dtype="float64")
    assert value.shape == () and float(value) == approx(1065.0, CLOSED_FORM)
    assert_close(grads["x"], [1651.0, -203.0, 350.0], CLOSED_FORM, "value_and_grad's gradient")
    result = client.compute(ROSEN, derivatives=["gradient", "hessian"], x=X0, dtype="float64")
    assert result.dtype == "float64" and result.meta.cache in ("hit", "miss") and result.meta.compute_ms >= 0
    assert result.jacobian is None and result.hvp is None


def test_a_repeated_program_is_answered_by_its_checked_numpy_plan(client: ts.Client) -> None:
    expression = "sum(tanh(x) * x**2) + 0.25"  # a program no other test of this module compiles
    first = client.compute(expression, derivatives=["gradient", "hessian"], x=X0, dtype="float64")
    client.compute(expression, derivatives=["gradient", "hessian"], x=X0, dtype="float64")
    third = client.compute(expression, derivatives=["gradient", "hessian"], x=X0 + 0.5, dtype="float64")
    assert (first.meta.executor, third.meta.executor) == ("tensorflow", "numpy")
    x = X0 + 0.5
    t = np.tanh(x)
    assert_close(third.gradient["x"], (1 - t**2) * x**2 + 2 * x * t, CLOSED_FORM, "gradient")  # type: ignore[index]
    second_derivative = -2 * t * (1 - t**2) * x**2 + 4 * x * (1 - t**2) + 2 * t
    assert_close(third.hessian["x"]["x"], np.diag(second_derivative), CLOSED_FORM, "hessian")  # type: ignore[index]


def test_the_builder_expression_gives_the_same_answer(client: ts.Client) -> None:
    x = ts.Var("x")
    f = (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()
    assert_close(client.gradient(f, x=X0, dtype="float64")["x"], rosen_grad(X0), CLOSED_FORM, "gradient")


def test_hessian_hvp_jvp_vjp_jacobian(client: ts.Client) -> None:
    h = client.hessian(ROSEN, x=X0, dtype="float64")
    assert_close(h["x"]["x"], rosen_hess(X0), CLOSED_FORM, "hessian")
    v = np.array([0.5, -1.0, 2.0])
    hv = client.hvp(ROSEN, tangents={"x": v}, x=X0, dtype="float64")
    assert_close(hv["x"], rosen_hess(X0) @ v, CLOSED_FORM, "hvp")
    a = np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0]])
    jac = client.jacobian("sin(A @ w)", constants={"A": a}, w=[0.3, -0.2], dtype="float64")
    expected_j = np.cos(a @ [0.3, -0.2])[:, None] * a
    assert_close(jac["w"], expected_j, CLOSED_FORM, "jacobian")
    jvp = client.jvp(
        "sin(A @ w)", tangents={"w": [1.0, 2.0]}, constants={"A": a}, w=[0.3, -0.2], dtype="float64"
    )
    assert_close(jvp, expected_j @ [1.0, 2.0], CLOSED_FORM, "jvp")
    ct = np.array([1.0, -1.0, 2.0])
    vjp = client.vjp("sin(A @ w)", cotangent=ct, constants={"A": a}, w=[0.3, -0.2], dtype="float64")
    assert_close(vjp["w"], ct @ expected_j, CLOSED_FORM, "vjp")


def test_derivative_of_order_k(client: ts.Client) -> None:
    ds = client.derivative("x**5", order=4, x=2.0, dtype="float64")
    assert [float(d) for d in ds] == approx([5 * 16, 20 * 8, 60 * 4, 120 * 2], CLOSED_FORM)
    # With a builder expression and several variables: wrt picks the one.
    x, y = ts.Var("x"), ts.Var("y")
    ds = client.derivative(ts.exp(x * y), order=2, wrt="x", x=0.5, y=3.0, dtype="float64")
    assert float(ds[1]) == approx(9.0 * np.exp(1.5), CLOSED_FORM)


def test_nonfinite_values_round_trip(client: ts.Client) -> None:
    value, grads = client.value_and_grad("x * 1.0", x=[np.nan, np.inf, -np.inf, 1.0], dtype="float64")
    assert np.isnan(value[0]) and value[1] == np.inf and value[2] == -np.inf and value[3] == 1.0
    assert_close(grads["x"], [1.0, 1.0, 1.0, 1.0], EXACT, "gradient")


def test_functions_health_and_ready(client: ts.Client) -> None:
    reference = client.functions()
    names = {f.name for f in reference.functions}
    assert {"sin", "sum", "logsumexp", "einsum"} <= names
    assert {c.name: c.value for c in reference.constants}["inf"] == np.inf
    assert client.health() == {"status": "ok"}
    readiness = client.ready()
    assert readiness.ready and readiness.status == "ready" and readiness.pool


def test_async_client_does_the_same(ready_server: LiveServer) -> None:
    async def run() -> tuple[dict[str, np.ndarray], ts.Readiness]:
        async with ts.AsyncClient(ready_server.url) as client:
            grads, readiness = await asyncio.gather(
                client.gradient(ROSEN, x=X0, dtype="float64"), client.ready()
            )
            return grads, readiness

    grads, readiness = asyncio.run(run())
    assert_close(grads["x"], rosen_grad(X0), CLOSED_FORM, "gradient")
    assert readiness.ready


# -- base64 ------------------------------------------------------------------------------------------


def test_base64_is_used_above_the_threshold_both_ways(ready_server: LiveServer) -> None:
    transport = RecordingTransport()
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=5), rng.normal(size=(40, 40))
    with ts.Client(ready_server.url, transport=transport, base64_threshold=100) as client:
        g_small = client.gradient("sum(sin(x))", x=small, dtype="float64")
        g_large = client.gradient("sum(sin(x))", x=large, dtype="float64")
    first, second = transport.bodies
    assert isinstance(first["variables"]["x"], list) and "encoding" not in first  # type: ignore[index]
    assert second["variables"]["x"]["shape"] == [40, 40] and second["encoding"] == "base64"  # type: ignore[index]
    assert b'"b64"' not in transport.response_bodies[0] and b'"b64"' in transport.response_bodies[1]
    assert_close(g_small["x"], np.cos(small), CLOSED_FORM, "gradient (JSON)")
    assert_close(g_large["x"], np.cos(large), CLOSED_FORM, "gradient (base64)")
    assert g_large["x"].shape == (40, 40) and g_large["x"].dtype == np.float64


def test_forced_json_and_forced_base64_give_the_same_numbers(ready_server: LiveServer) -> None:
    x = np.linspace(-1, 1, 7)
    with (
        ts.Client(ready_server.url, encoding="json") as as_json,
        ts.Client(ready_server.url, encoding="base64") as b64,
    ):
        a = as_json.hessian("sum(exp(x) * x)", x=x, dtype="float64")["x"]["x"]
        b = b64.hessian("sum(exp(x) * x)", x=x, dtype="float64")["x"]["x"]
    assert_close(a, b, EXACT, "JSON vs base64")
    assert_close(np.diag(a), np.exp(x) * (x + 2), CLOSED_FORM, "hessian diagonal")


# -- errors the server sends ---------------------------------------------------------------------------


def test_parse_error_with_caret(client: ts.Client) -> None:
    with pytest.raises(ts.ParseError) as caught:
        client.gradient("sum(x +", x=[1.0])
    error = caught.value
    assert error.status == 400 and error.line == 1 and error.column == 8 and error.source == "expression"
    assert error.snippet is not None and error.snippet.splitlines()[1].index("^") == 7


# The live server's per-input limit (one worker, this environment: it follows the memory ceiling).
# One element more, as booleans: the count is refused before the dtype, and 1 byte per element keeps
# the body under the body limit however large the derived limit is (at most max_tensor_elements).
_INPUT_LIMIT = Settings(workers=1).limits().max_input_elements
_OVER_LIMIT = np.ones(_INPUT_LIMIT + 1, dtype=bool)


@pytest.mark.parametrize(
    ("call", "cls", "field"),
    [
        (lambda c: c.gradient("sum(xx)", x=[1.0]), ts.UnknownName, None),
        (lambda c: c.gradient("x + y", x=[1.0, 2.0], y=[1.0, 2.0, 3.0]), ts.ShapeError, None),
        (lambda c: c.hvp("sum(x**3)", tangents={"x": [1.0]}, x=[1.0, 2.0]), ts.ShapeError, "tangents.x"),
        (lambda c: c.hessian("x * 2", x=[1.0, 2.0]), ts.InvalidRequest, None),
        (lambda c: c.derivative("sum(x)", order=9, x=[1.0]), ts.LimitExceeded, None),
        (lambda c: c.gradient("sum(x)", x=_OVER_LIMIT), ts.LimitExceeded, "variables.x"),
        (lambda c: c.gradient("sum(inv(A))", A=[[1.0, 1.0], [1.0, 1.0]]), ts.EvaluationError, None),
    ],
)
def test_errors_map_to_their_classes(client: ts.Client, call: object, cls: type, field: str | None) -> None:
    with pytest.raises(ts.APIError) as caught:
        call(client)  # type: ignore[operator]
    assert isinstance(caught.value, cls), (type(caught.value), caught.value.problem)
    assert caught.value.status in (400, 413, 422)
    if field is not None:
        assert caught.value.field == field


def test_limit_exceeded_carries_the_limit(client: ts.Client) -> None:
    with pytest.raises(ts.LimitExceeded) as caught:
        client.gradient("sum(x)", x=_OVER_LIMIT)
    assert caught.value.limit == "max_input_elements" and caught.value.allowed == _INPUT_LIMIT


def test_payload_too_large_and_not_found(ready_server: LiveServer) -> None:
    with ts.Client(ready_server.url, encoding="json") as client:
        with pytest.raises(ts.PayloadTooLarge):
            # Under the element limit, over the body limit: 900k float32 values are ~18 MB of JSON > 16 MiB.
            client.gradient("sum(x)", x=np.full(900_000, 0.1234567, dtype=np.float32))
    with ts.Client(ready_server.url + "/nowhere") as client, pytest.raises(ts.NotFound):
        client.functions()


def test_unreachable_server_is_connect_error() -> None:
    sleeps: list[float] = []
    with (
        ts.Client("http://127.0.0.1:9", sleep=sleeps.append, retry=2) as client,
        pytest.raises(ts.ConnectError),
    ):
        client.health()
    assert len(sleeps) == 2


# -- models and steps (issue 4) ---------------------------------------------------------------------------

DENSE = {"input_shape": [3], "layers": [{"type": "dense", "units": 2}], "seed": 1}
XB = np.array([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5], [-1.0, 1.0, 1.0], [0.2, 0.3, -0.7]])
YB = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [-1.0, 2.0]])
W = np.array([[0.1, -0.2], [0.3, 0.4], [-0.5, 0.6]])
B = np.array([0.05, -0.1])


def mse_grads(w: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    residual = XB @ w + b - YB
    n = residual.size
    return float((residual**2).mean()), XB.T @ (2 * residual / n), (2 * residual / n).sum(axis=0)


def test_describe_model(client: ts.Client) -> None:
    described = client.describe_model(DENSE, optimizer="adam")
    assert [w.shape for w in described.weights] == [(3, 2), (2,)]
    assert described.param_count == 8 and described.trainable_count == 8 and described.output_shape == (2,)
    assert described.optimizer_state is not None and len(described.optimizer_state) >= 1


def test_model_gradient_matches_the_closed_form(client: ts.Client) -> None:
    result = client.model_gradient(
        DENSE, XB, YB, weights=[W, B], loss="mse", wrt=["weights", "inputs"], dtype="float64"
    )
    loss, gw, gb = mse_grads(W, B)
    assert result.loss == approx(loss, CLOSED_FORM) and result.regularization_loss == 0.0
    assert result.weight_gradients is not None and result.input_gradients is not None
    assert_close(result.weight_gradients[0], gw, DERIVED_CHAIN, "kernel gradient")
    assert_close(result.weight_gradients[1], gb, DERIVED_CHAIN, "bias gradient")
    residual = XB @ W + B - YB
    input_gradients = (2 * residual / residual.size) @ W.T
    assert_close(result.input_gradients, input_gradients, DERIVED_CHAIN, "input gradients")


def test_adversarial_fgsm_is_x_plus_eps_sign_of_the_input_gradient(client: ts.Client) -> None:
    result = client.adversarial(DENSE, XB, YB, epsilon=0.1, weights=[W, B], loss="mse", dtype="float64")
    residual = XB @ W + B - YB
    grad_x = (2 * residual / residual.size) @ W.T
    assert result.x_adv is not None
    assert_close(result.x_adv, XB + 0.1 * np.sign(grad_x), CLOSED_FORM, "x_adv")
    assert result.adversarial_loss is not None and result.adversarial_loss > result.loss


def test_train_step_is_one_sgd_step(client: ts.Client) -> None:
    result = client.train_step(
        DENSE,
        XB,
        YB,
        optimizer={"type": "sgd", "learning_rate": 0.1},
        weights=[W, B],
        loss="mse",
        dtype="float64",
    )
    loss, gw, gb = mse_grads(W, B)
    assert result.steps == 1 and result.loss == approx(loss, CLOSED_FORM)
    assert result.gradient_norm == approx(float(np.sqrt((gw**2).sum() + (gb**2).sum())), DERIVED_CHAIN)
    # Keras keeps the learning rate in a float32 variable even in float64: 0.1 is off by 1.5e-8 relative.
    assert_close(result.weights[0], W - 0.1 * gw, FLOAT32_LEARNING_RATE, "kernel")
    assert_close(result.weights[1], B - 0.1 * gb, FLOAT32_LEARNING_RATE, "bias")


def test_streamed_training_reports_progress_and_equals_the_unstreamed_run(client: ts.Client) -> None:
    options = {
        "optimizer": {"type": "adam", "learning_rate": 0.05},
        "weights": [W, B],
        "loss": "mse",
        "dtype": "float64",
    }
    run = client.train(DENSE, XB, YB, steps=12, progress_every=4, **options)  # type: ignore[arg-type]
    progress = list(run)
    assert [p.step for p in progress] == [4, 8, 12] and all(p.steps == 12 for p in progress)
    assert run.result is not None and run.result.steps == 12
    whole = client.train_step(DENSE, XB, YB, steps=12, **options)  # type: ignore[arg-type]
    # Streaming runs the same steps in chunks, feeding weights and state back: the same computation.
    for i, (streamed, direct) in enumerate(zip(run.result.weights, whole.weights, strict=True)):
        assert_close(streamed, direct, EXACT, f"weight {i}")
    assert run.result.loss < progress[0].loss  # type: ignore[operator]
    # Feeding weights and optimizer state back continues the same run: 12 + 3 = 15 steps.
    more = client.train_step(
        DENSE,
        XB,
        YB,
        steps=3,
        optimizer={"type": "adam", "learning_rate": 0.05},
        weights=whole.weights,
        optimizer_state=whole.optimizer_state,
        loss="mse",
        dtype="float64",
    )
    fifteen = client.train_step(DENSE, XB, YB, steps=15, **options)  # type: ignore[arg-type]
    assert_close(more.weights[0], fifteen.weights[0], EXACT, "kernel after 12 + 3 and 15 steps")


def test_step_minimizes_an_expression(client: ts.Client) -> None:
    result = client.step(
        "sum((x - 3.0)**2)", optimizer={"type": "sgd", "learning_rate": 0.25}, x=[1.0, 5.0], dtype="float64"
    )
    # x - lr * 2 (x - 3) = [2, 4]; value before the step: 4 + 4.
    assert_close(result.variables["x"], [2.0, 4.0], CLOSED_FORM, "x")
    assert result.value == approx(8.0, CLOSED_FORM) and result.steps == 1


def test_model_errors_name_the_field(client: ts.Client) -> None:
    with pytest.raises(ts.InvalidRequest) as caught:
        client.describe_model({"input_shape": [3], "layers": [{"type": "dense", "units": -1}]})
    assert caught.value.field is not None and "units" in caught.value.field


def test_a_ragged_tensor_is_refused_before_sending(client: ts.Client) -> None:
    with pytest.raises(ValueError, match="variables.x is not a regular tensor"):
        client.gradient("sum(x)", x=[[1.0], [2.0, 3.0]])
