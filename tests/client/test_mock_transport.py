"""The client's HTTP behaviour against httpx.MockTransport: retries, backoff, Retry-After, error mapping,
headers and base64 switching. No server; the sleep function is injected, so nothing waits."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import numpy as np
import pytest

import service.client as ts

GRADIENT_OK = {
    "value": 5.0,
    "gradient": {"x": [2.0, 4.0]},
    "dtype": "float32",
    "meta": {"cache": "miss", "compute_ms": 1.0, "total_ms": 2.0},
}


def problem(status: int, code: str, **extra: object) -> httpx.Response:
    retry_after = extra.pop("retry_after_header", None)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    body = {"type": f"urn:tapeserve:problem:{code}", "title": code, "status": status, "code": code,
            "detail": f"detail of {code}", "instance": "/v1/gradient", **extra}  # fmt: skip
    return httpx.Response(status, json=body, headers=headers)


def scripted(responses: list[httpx.Response | Exception]) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        item = responses.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    return httpx.MockTransport(handler), seen


def make_client(transport: httpx.MockTransport, sleeps: list[float], **kwargs: object) -> ts.Client:
    retry = kwargs.pop("retry", ts.Retry(attempts=3, backoff=0.5, max_backoff=4.0, rng=random.Random(7)))
    return ts.Client("http://tapeserve.test", transport=transport, sleep=sleeps.append, retry=retry, **kwargs)  # type: ignore[arg-type]


def test_overloaded_is_retried_after_retry_after_then_succeeds() -> None:
    transport, seen = scripted(
        [problem(503, "overloaded", retry_after_header=2), httpx.Response(200, json=GRADIENT_OK)]
    )
    sleeps: list[float] = []
    with make_client(transport, sleeps) as client:
        grads = client.gradient("sum(x**2)", x=[1.0, 2.0])
    np.testing.assert_array_equal(grads["x"], [2.0, 4.0])
    assert len(seen) == 2
    assert len(sleeps) == 1 and 2.0 <= sleeps[0] <= 2.5  # Retry-After plus at most `backoff` of jitter


def test_worker_crashed_and_connection_errors_back_off_exponentially_with_jitter() -> None:
    transport, seen = scripted(
        [
            problem(503, "worker_crashed"),
            httpx.ConnectError("refused"),
            httpx.RemoteProtocolError("server disconnected"),
            httpx.Response(200, json=GRADIENT_OK),
        ]
    )
    sleeps: list[float] = []
    with make_client(transport, sleeps) as client:
        client.gradient("sum(x**2)", x=[1.0, 2.0])
    assert len(seen) == 4
    # Full jitter: retry n waits uniformly in [0, min(max_backoff, backoff * 2**n)].
    caps = [0.5, 1.0, 2.0]
    assert len(sleeps) == 3
    assert all(0.0 <= s <= cap for s, cap in zip(sleeps, caps, strict=True))
    # The same seed gives the same waits: the jitter comes from the policy's rng only.
    rng = random.Random(7)
    assert sleeps == [rng.uniform(0.0, cap) for cap in caps]


def test_retries_stop_after_the_configured_attempts() -> None:
    transport, seen = scripted([problem(503, "overloaded") for _ in range(3)])
    sleeps: list[float] = []
    with make_client(transport, sleeps, retry=ts.Retry(attempts=2, rng=random.Random(0))) as client:
        with pytest.raises(ts.Overloaded) as caught:
            client.gradient("sum(x)", x=[1.0])
    assert len(seen) == 3 and len(sleeps) == 2
    assert caught.value.status == 503 and caught.value.code_value == "overloaded"


def test_a_crashed_worker_is_retried_once_by_default() -> None:
    # A request that kills its worker may be the cause: sending it again and again would take down
    # one worker per retry. Other retryable answers in between do not reset the count.
    script = [problem(503, "worker_crashed"), problem(503, "overloaded"), problem(503, "worker_crashed")]
    transport, seen = scripted([*script, httpx.Response(200, json=GRADIENT_OK)])
    sleeps: list[float] = []
    with make_client(transport, sleeps) as client:
        with pytest.raises(ts.WorkerCrashed) as caught:
            client.gradient("sum(x)", x=[1.0])
    assert len(seen) == 3 and len(sleeps) == 2
    assert caught.value.code_value == "worker_crashed"
    # More when asked for: Retry(crash_retries=2) sends it a third time.
    transport, seen = scripted([*script, httpx.Response(200, json=GRADIENT_OK)])
    retry = ts.Retry(attempts=3, crash_retries=2, rng=random.Random(0))
    with make_client(transport, sleeps, retry=retry) as client:
        client.gradient("sum(x)", x=[1.0])
    assert len(seen) == 4


def test_the_async_client_retries_a_crashed_worker_once_too() -> None:
    transport, seen = scripted([problem(503, "worker_crashed") for _ in range(3)])

    async def no_wait(seconds: float) -> None:
        pass

    async def run() -> None:
        async with ts.AsyncClient("http://tapeserve.test", transport=transport, sleep=no_wait) as client:
            await client.gradient("sum(x)", x=[1.0])

    with pytest.raises(ts.WorkerCrashed):
        asyncio.run(run())
    assert len(seen) == 2


def test_connection_failure_after_retries_is_connect_error() -> None:
    transport, seen = scripted([httpx.ConnectError("refused") for _ in range(4)])
    sleeps: list[float] = []
    with make_client(transport, sleeps) as client:
        with pytest.raises(ts.ConnectError, match="cannot reach http://tapeserve.test"):
            client.health()
    assert len(seen) == 4 and len(sleeps) == 3


def test_a_retry_after_longer_than_the_cap_is_raised_at_once() -> None:
    transport, seen = scripted([problem(503, "overloaded", retry_after_header=600)])
    sleeps: list[float] = []
    with make_client(transport, sleeps) as client:
        with pytest.raises(ts.Overloaded) as caught:
            client.gradient("sum(x)", x=[1.0])
    assert caught.value.retry_after == 600.0
    assert sleeps == [] and len(seen) == 1


def test_rate_limited_429_honours_retry_after() -> None:
    transport, _ = scripted(
        [problem(429, "rate_limited", retry_after_header=1), httpx.Response(200, json={"status": "ok"})]
    )
    sleeps: list[float] = []
    with make_client(transport, sleeps) as client:
        assert client.health() == {"status": "ok"}
    assert 1.0 <= sleeps[0] <= 1.5


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "parse_error", ts.ParseError),
        (400, "unknown_name", ts.UnknownName),
        (400, "unsupported_operation", ts.UnsupportedOperation),
        (400, "invalid_argument", ts.InvalidArgument),
        (422, "invalid_request", ts.InvalidRequest),
        (422, "shape_error", ts.ShapeError),
        (422, "dtype_error", ts.DTypeError),
        (422, "not_differentiable", ts.NotDifferentiable),
        (422, "evaluation_error", ts.EvaluationError),
        (422, "limit_exceeded", ts.LimitExceeded),
        (413, "payload_too_large", ts.PayloadTooLarge),
        (401, "unauthorized", ts.Unauthorized),
        (404, "not_found", ts.NotFound),
        (405, "method_not_allowed", ts.MethodNotAllowed),
        (415, "unsupported_media_type", ts.UnsupportedMediaType),
        (500, "internal_error", ts.ServerError),
        (504, "timeout", ts.Timeout),
        (401, "some_future_code", ts.Unauthorized),  # unknown code: the status decides
        (502, "bad_gateway", ts.ServerError),
    ],
)
def test_each_problem_code_maps_to_its_class_and_is_not_retried(status: int, code: str, cls: type) -> None:
    transport, seen = scripted([problem(status, code, field="variables.x")])
    sleeps: list[float] = []
    with make_client(transport, sleeps) as client:
        with pytest.raises(cls) as caught:
            client.gradient("sum(x)", x=[1.0])
    assert type(caught.value) is cls
    assert caught.value.status == status and caught.value.field == "variables.x"
    assert f"detail of {code}" in str(caught.value)
    assert sleeps == [] and len(seen) == 1


def test_parse_error_carries_line_column_and_snippet() -> None:
    transport, _ = scripted(
        [problem(400, "parse_error", source="expression", line=1, column=8, snippet="sum(x +\n       ^")]
    )
    with make_client(transport, []) as client, pytest.raises(ts.ParseError) as caught:
        client.gradient("sum(x +", x=[1.0])
    error = caught.value
    assert (error.line, error.column, error.source) == (1, 8, "expression")
    assert error.snippet == "sum(x +\n       ^"
    assert str(error).endswith("sum(x +\n       ^")


def test_a_non_problem_error_page_still_maps_by_status() -> None:
    transport, _ = scripted([httpx.Response(502, text="<html>Bad Gateway</html>")])
    with make_client(transport, [], retry=0) as client, pytest.raises(ts.ServerError) as caught:
        client.functions()
    assert caught.value.status == 502 and "Bad Gateway" in caught.value.detail


def test_api_key_user_agent_and_strict_json_body() -> None:
    transport, seen = scripted([httpx.Response(200, json=GRADIENT_OK)])
    with make_client(transport, [], api_key="s3cret") as client:
        client.gradient("sum(x)", x=np.array([1.0, np.nan, np.inf]))
    request = seen[0]
    assert request.headers["authorization"] == "Bearer s3cret"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("tapeserve-client/")
    body = json.loads(request.content)  # strict: json.loads would accept NaN, so check the text too
    assert b"NaN," not in request.content and body["variables"]["x"] == [1.0, "NaN", "Infinity"]


def test_api_key_and_url_default_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAPESERVE_URL", "http://from-env.test:9")
    monkeypatch.setenv("TAPESERVE_API_KEY", "envkey")
    transport, seen = scripted([httpx.Response(200, json={"status": "ok"})])
    with ts.Client(transport=transport) as client:
        client.health()
    assert str(seen[0].url) == "http://from-env.test:9/healthz"
    assert seen[0].headers["authorization"] == "Bearer envkey"


def test_small_tensors_travel_as_json_large_ones_as_base64_and_ask_for_base64_back() -> None:
    transport, seen = scripted([httpx.Response(200, json=GRADIENT_OK), httpx.Response(200, json=GRADIENT_OK)])
    with make_client(transport, [], base64_threshold=10) as client:
        client.gradient("sum(x)", x=np.arange(10.0))
        client.gradient("sum(x)", x=np.arange(11.0))
    small, large = (json.loads(r.content) for r in seen)
    assert small["variables"]["x"] == list(np.arange(10.0)) and "encoding" not in small
    assert large["variables"]["x"]["dtype"] == "float32" and large["variables"]["x"]["shape"] == [11]
    assert large["encoding"] == "base64"


def test_a_large_hessian_asks_for_base64_even_for_small_inputs() -> None:
    transport, seen = scripted([httpx.Response(200, json={**GRADIENT_OK, "hessian": {"x": {"x": [[1.0]]}}})])
    with make_client(transport, [], base64_threshold=50) as client:
        client.hessian("sum(x**2)", x=np.ones(8))  # 8 elements in, 64 out
    body = json.loads(seen[0].content)
    assert body["variables"]["x"] == [1.0] * 8 and body["encoding"] == "base64"


def test_base64_responses_and_nonfinite_strings_are_decoded() -> None:
    grad = np.array([[1.5, -2.0], [np.inf, 0.25]], dtype=np.float64)
    payload = {
        "value": "NaN",
        "gradient": {"x": ts_encode_b64(grad)},
        "dtype": "float64",
        "meta": {"cache": "hit", "compute_ms": 0.5, "total_ms": 1.0},
    }
    transport, _ = scripted([httpx.Response(200, json=payload)])
    with make_client(transport, []) as client:
        result = client.compute("x", x=np.zeros((2, 2)), dtype="float64")
    assert np.isnan(result.value) and result.value.shape == ()
    np.testing.assert_array_equal(result.gradient["x"], grad)  # type: ignore[index]
    assert result.gradient["x"].dtype == np.float64  # type: ignore[index]
    assert result.meta.cache == "hit"
    assert result.meta.executor == "tensorflow"  # servers before meta.executor: TensorFlow ran it

    payload["meta"] = {"cache": "hit", "compute_ms": 0.5, "total_ms": 1.0, "executor": "numpy"}
    transport, _ = scripted([httpx.Response(200, json=payload)])
    with make_client(transport, []) as client:
        assert client.compute("x", x=np.zeros((2, 2)), dtype="float64").meta.executor == "numpy"


def ts_encode_b64(array: np.ndarray) -> dict[str, object]:
    import base64

    return {
        "dtype": "float64",
        "shape": list(array.shape),
        "b64": base64.b64encode(array.astype("<f8").tobytes()).decode(),
    }


def test_a_response_that_is_not_the_api_raises_decoding_error() -> None:
    transport, _ = scripted([httpx.Response(200, text="not json"), httpx.Response(200, json={"value": 1})])
    with make_client(transport, []) as client:
        with pytest.raises(ts.DecodingError):
            client.gradient("x", x=1.0)
        with pytest.raises(ts.DecodingError):
            client.gradient("x", x=1.0)


def test_readyz_503_is_an_answer_not_an_error() -> None:
    transport, seen = scripted([httpx.Response(503, json={"status": "starting", "pool": {"workers": 1}})])
    sleeps: list[float] = []
    with make_client(transport, sleeps) as client:
        readiness = client.ready()
    assert readiness.ready is False and readiness.status == "starting" and readiness.pool == {"workers": 1}
    assert len(seen) == 1 and sleeps == []


def test_a_variable_named_like_an_option_goes_in_variables() -> None:
    transport, seen = scripted([httpx.Response(200, json={**GRADIENT_OK, "gradient": {"dtype": [1.0]}})])
    with make_client(transport, []) as client:
        grads = client.gradient("sum(dtype)", {"dtype": [1.0]}, dtype="float64")
        with pytest.raises(TypeError, match="both"):
            client.gradient("sum(x)", {"x": [1.0]}, x=[2.0])
    assert json.loads(seen[0].content)["variables"] == {"dtype": [1.0]}
    assert list(grads) == ["dtype"]


def test_async_client_retries_with_an_awaited_sleep() -> None:
    transport, seen = scripted(
        [problem(503, "overloaded", retry_after_header=1), httpx.Response(200, json=GRADIENT_OK)]
    )
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    async def run() -> dict[str, np.ndarray]:
        async with ts.AsyncClient("http://tapeserve.test", transport=transport, sleep=record) as client:
            return await client.gradient("sum(x**2)", x=[1.0, 2.0])

    grads = asyncio.run(run())
    np.testing.assert_array_equal(grads["x"], [2.0, 4.0])
    assert len(seen) == 2 and len(sleeps) == 1 and sleeps[0] >= 1.0


def test_a_streamed_run_yields_progress_then_the_result_and_raises_error_lines() -> None:
    result = {"loss": 0.5, "data_loss": 0.5, "regularization_loss": 0.0, "gradient_norm": 1.0,
              "clipped_gradient_norm": 1.0, "weights": [[1.0, 2.0]], "optimizer_state": [3, [0.1, 0.2]],
              "steps": 3, "meta": {}}  # fmt: skip
    progress = [{"type": "progress", "step": i, "steps": 3, "loss": 1.0 / i} for i in (1, 2, 3)]
    ndjson = "".join(json.dumps(line) + "\n" for line in [*progress, {"type": "result", **result}])
    failing = (
        json.dumps(progress[0])
        + "\n"
        + json.dumps({"type": "error", "problem": {"code": "timeout", "status": 504, "detail": "late"}})
        + "\n"
    )
    transport, seen = scripted([httpx.Response(200, text=ndjson), httpx.Response(200, text=failing)])
    model = {"input_shape": [2], "layers": [{"type": "dense", "units": 1}]}
    with make_client(transport, []) as client:
        run = client.train(model, np.ones((4, 2)), np.ones((4, 1)), optimizer="sgd", steps=3)
        steps = [p.step for p in run]
        assert steps == [1, 2, 3] and run.result is not None and run.result.steps == 3
        np.testing.assert_array_equal(run.result.weights[0], [1.0, 2.0])
        assert run.result.optimizer_state[0].dtype.kind == "i"
        with pytest.raises(ts.Timeout, match="late"):
            client.train(model, np.ones((4, 2)), np.ones((4, 1)), optimizer="sgd", steps=3).wait()
    body = json.loads(seen[0].content)
    assert body["stream"] is True and body["optimizer"] == {"type": "sgd"} and body["steps"] == 3


def test_sync_and_async_clients_have_the_same_methods() -> None:
    import inspect

    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            n: inspect.signature(f) for n, f in vars(cls).items() if callable(f) and not n.startswith("_")
        }

    sync, async_ = public(ts.Client), public(ts.AsyncClient)
    assert set(sync) - {"close"} == set(async_) - {"aclose"}
    for name in set(sync) - {"close"}:
        params = lambda s: [(p.name, p.kind, p.default) for p in s.parameters.values()]  # noqa: E731
        assert params(sync[name]) == params(async_[name]), name


def test_each_method_shows_its_own_signature_docstring_and_result() -> None:
    import inspect
    import typing

    for cls in (ts.Client, ts.AsyncClient):
        for name in ("compute", "gradient", "hessian", "jvp", "functions", "ready", "train", "step"):
            method = getattr(cls, name)
            signature = inspect.signature(method)
            assert method.__qualname__ == f"{cls.__name__}.{name}" and method.__doc__, name
            assert next(iter(signature.parameters)) == "self", name
            assert not str(signature.return_annotation).startswith("Call["), name
            assert inspect.iscoroutinefunction(method) == (cls is ts.AsyncClient and name != "train"), name
    assert inspect.signature(ts.Client.gradient).return_annotation == "dict[str, np.ndarray]"
    assert typing.get_type_hints(ts.AsyncClient.train)["return"] is ts.AsyncTrainingRun
    assert typing.get_type_hints(ts.Client.compute)["return"] is ts.Derivatives
