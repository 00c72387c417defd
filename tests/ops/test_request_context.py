"""Request ids, the access log and /metrics on the in-process app (fake pool)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import orjson
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api import Settings, create_app
from service.api.logging import ACCESS_LOGGER, JSONFormatter, current_request_id
from service.api.metrics import _job_kind
from service.errors import ShapeError
from service.jobs import GradientJob, StackedGradientJob, TrainStepJob
from tests.api.fakes import FakePool

KEY = "secret-key-never-logged"
SECRET_EXPRESSION = "sum(x**2) + 4242.125"
GRAD = {"expression": SECRET_EXPRESSION, "variables": {"x": [31337.5, 2.0]}}


@pytest.fixture(scope="module")
def pool() -> FakePool:
    return FakePool()


@pytest.fixture(scope="module")
def client(pool: FakePool) -> Iterator[TestClient]:
    app = create_app(Settings(api_keys=KEY), pool=pool)
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(autouse=True)
def _reset(pool: FakePool) -> None:
    pool.error = None


def test_request_id_is_generated_and_returned(client: TestClient) -> None:
    first = client.post("/v1/gradient", json=GRAD).headers["x-request-id"]
    second = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", first) and re.fullmatch(r"[0-9a-f]{32}", second)
    assert first != second


@pytest.mark.parametrize("given", ["abc", "trace-0123.span_9", "A" * 128])
def test_valid_client_request_id_is_kept(client: TestClient, given: str) -> None:
    r = client.get("/v1/nothing", headers={"X-Request-ID": given})
    assert r.headers["x-request-id"] == given
    assert r.json()["request_id"] == given


@pytest.mark.parametrize("given", ["", "A" * 129, "has space", "semi;colon", "new\tline", "ünïcode", "a/b"])
def test_invalid_client_request_id_is_replaced(client: TestClient, given: str) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": given.encode("utf-8")})  # type: ignore[dict-item]
    assert r.headers["x-request-id"] != given
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_every_problem_carries_the_request_id(client: TestClient, pool: FakePool) -> None:
    cases = [
        client.post("/v1/gradient", content=b"{", headers={"Content-Type": "application/json"}),  # 400
        client.post("/v1/gradient", json={"expression": "sum(x"}),  # parse error
        client.post("/v1/gradient", content=b"x", headers={"Content-Type": "text/plain"}),  # 415
        client.post("/v1/gradient", json={"variables": {}}),  # 422 validation
        client.get("/v1/gradient"),  # 405
        client.post("/v1/gradient", json=GRAD, headers={"Authorization": "Bearer wrong"}),  # 401
    ]
    pool.error = ShapeError("shapes differ")
    cases.append(client.post("/v1/gradient", json=GRAD))
    for r in cases:
        assert r.headers["content-type"] == "application/problem+json", r.text
        assert r.json()["request_id"] == r.headers["x-request-id"], r.text


def test_request_id_reaches_the_umbridge_envelope_header(client: TestClient) -> None:
    r = client.post("/umbridge/Nope", json={}, headers={"X-Request-ID": "um-1"})
    assert r.status_code == 404 and "error" in r.json()
    assert r.headers["x-request-id"] == "um-1"


def test_access_log_line_has_fields_and_no_user_data(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        client.post("/v1/gradient", json=GRAD, headers={"X-Request-ID": "log-check-1"})
        client.post(
            "/v1/gradient",
            json={**GRAD, "expression": SECRET_EXPRESSION + " +"},
            headers={"X-Request-ID": "e"},
        )
        client.get("/v1/functions?secret_query=zzz")
    access = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert len(access) == 3
    first = access[0]
    assert (first.method, first.route, first.status) == ("POST", "/v1/gradient", 200)  # type: ignore[attr-defined]
    assert first.duration_ms >= 0  # type: ignore[attr-defined]
    assert re.fullmatch(r"[0-9a-f]{8}", first.key_id)  # type: ignore[attr-defined]
    assert access[1].status == 400  # type: ignore[attr-defined]
    formatter = JSONFormatter()
    server_side = [r for r in caplog.records if r.name.startswith(("tapeserve", "uvicorn"))]  # not httpx's
    everything = "\n".join(formatter.format(r) for r in server_side)
    for secret in (KEY, "4242.125", "31337.5", "secret_query", "zzz"):
        assert secret not in everything, secret


def test_json_formatter_writes_one_object_per_line() -> None:
    record = logging.LogRecord("tapeserve.access", logging.INFO, __file__, 1, "POST %s %d", ("/x", 200), None)
    record.route = "/x"
    record.status = 200
    line = JSONFormatter().format(record)
    assert "\n" not in line
    entry = orjson.loads(line)
    assert entry["message"] == "POST /x 200" and entry["route"] == "/x" and entry["status"] == 200
    assert entry["level"] == "info" and entry["logger"] == "tapeserve.access"
    assert current_request_id() is None or "request_id" in entry


# ------------------------------------------------------------------------------------ /metrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_count_requests_by_route_template_and_status(pool: FakePool) -> None:
    # A fresh app: its registry starts empty, so the counts below are exact.
    with TestClient(create_app(Settings(), pool=FakePool()), raise_server_exceptions=False) as client:
        for _ in range(3):
            assert client.post("/v1/gradient", json=GRAD).status_code == 200
        client.post("/v1/gradient", json={"expression": "sum(x"})
        client.get("/no/such/path/123")
        client.get("/no/such/path/456")
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    s = _samples(r.text)
    ok = (("method", "POST"), ("route", "/v1/gradient"), ("status", "200"))
    assert s[("tapeserve_http_requests_total", ok)] == 3
    assert s[("tapeserve_http_request_duration_seconds_count", ok)] == 3
    bad = (("method", "POST"), ("route", "/v1/gradient"), ("status", "400"))
    assert s[("tapeserve_http_requests_total", bad)] == 1
    # Unmatched paths share one label: scanners cannot create series.
    lost = (("method", "GET"), ("route", "unmatched"), ("status", "404"))
    assert s[("tapeserve_http_requests_total", lost)] == 2
    assert not any("/no/such" in str(key) for key in s)
    # The fake pool answers cache "miss" with compute_ms 0 for each job.
    assert s[("tapeserve_jobs_total", (("cache", "miss"), ("kind", "gradient")))] == 3
    assert s[("tapeserve_compile_seconds_count", (("kind", "gradient"),))] == 3
    assert s[("tapeserve_queue_depth", ())] == 0
    assert s[("tapeserve_in_flight", ())] == 0
    assert ("tapeserve_batching_stacked_calls_total", ()) in s


def test_metrics_count_job_errors_by_code() -> None:
    pool = FakePool()
    with TestClient(create_app(Settings(), pool=pool), raise_server_exceptions=False) as client:
        pool.error = ShapeError("shapes differ")
        assert client.post("/v1/gradient", json=GRAD).status_code == 422
        s = _samples(client.get("/metrics").text)
    assert s[("tapeserve_job_errors_total", (("code", "shape_error"), ("kind", "gradient")))] == 1


def test_two_apps_have_separate_registries() -> None:
    with (
        TestClient(create_app(Settings(), pool=FakePool())) as a,
        TestClient(create_app(Settings(), pool=FakePool())) as b,
    ):
        a.get("/healthz")
        a.get("/healthz")
        b.get("/healthz")
        key = ("tapeserve_http_requests_total", (("method", "GET"), ("route", "/healthz"), ("status", "200")))
        assert _samples(a.get("/metrics").text)[key] == 2
        assert _samples(b.get("/metrics").text)[key] == 1


def test_job_kind_labels() -> None:
    assert _job_kind(GradientJob.__new__(GradientJob)) == "gradient"
    assert _job_kind(StackedGradientJob.__new__(StackedGradientJob)) == "stacked_gradient"
    assert _job_kind(TrainStepJob.__new__(TrainStepJob)) == "train_step"
