"""Keys, metrics and JSON logs on a real server (``tapeserve serve`` with one worker)."""

from __future__ import annotations

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LiveServer
from tests.ops.conftest import API_KEY

MARKER_VALUE = 9876.03125  # exactly representable; must never appear in a log line


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_metrics_need_the_key_and_report_cache_and_compile(
    ops_server: LiveServer, ops_client: httpx.Client
) -> None:
    assert httpx.get(f"{ops_server.url}/metrics").status_code == 401
    before = ops_client.get("/metrics").text
    # A program no other test uses: the first call compiles (miss), the others reuse it (hit); after
    # the second, its numpy plan answers.
    body = {"expression": "sum(tanh(x) * 3.25)", "variables": {"x": [0.5, MARKER_VALUE]}, "dtype": "float64"}
    metas = [ops_client.post("/v1/gradient", json=body).json()["meta"] for _ in range(3)]
    assert [m["cache"] for m in metas] == ["miss", "hit", "hit"]
    assert [m["executor"] for m in metas] == ["tensorflow", "tensorflow", "numpy"]
    after = ops_client.get("/metrics").text
    for cache, count in (("miss", 1), ("hit", 2)):
        grew = _metric(after, "tapeserve_jobs_total", kind="gradient", cache=cache) - _metric(
            before, "tapeserve_jobs_total", kind="gradient", cache=cache
        )
        assert grew == count, cache
    planned = _metric(after, "tapeserve_numpy_plan_jobs_total", kind="gradient")
    assert planned - _metric(before, "tapeserve_numpy_plan_jobs_total", kind="gradient") == 1
    compiles = _metric(after, "tapeserve_compile_seconds_count", kind="gradient")
    assert compiles - _metric(before, "tapeserve_compile_seconds_count", kind="gradient") == 1
    assert _metric(after, "tapeserve_compile_seconds_sum", kind="gradient") > 0
    ok = {"method": "POST", "route": "/v1/gradient", "status": "200"}
    assert (
        _metric(after, "tapeserve_http_requests_total", **ok)
        - _metric(before, "tapeserve_http_requests_total", **ok)
        == 3
    )
    assert _metric(after, "tapeserve_worker_rss_bytes", worker="0") > 50 * 2**20  # TF alone is more
    assert _metric(after, "tapeserve_worker_restarts_total", worker="0", cause="crash") == 0
    assert _metric(after, "tapeserve_ready") == 1
    assert "tapeserve_queue_depth" in after and "tapeserve_worker_in_flight" in after


def test_logs_are_json_with_request_ids_and_no_secrets(
    ops_server: LiveServer, ops_client: httpx.Client
) -> None:
    ops_client.post(
        "/v1/gradient",
        json={"expression": "sum(x) + 1", "variables": {"x": [MARKER_VALUE]}},
        headers={"X-Request-ID": "live-log-check"},
    )
    ops_client.post("/v1/gradient", json={"expression": f"sum(x {MARKER_VALUE}", "variables": {"x": [1.0]}})
    httpx.post(f"{ops_server.url}/v1/gradient", json={}, headers={"Authorization": "Bearer not-the-key"})
    lines = [line for line in ops_server.log().splitlines() if line.strip()]
    entries = []
    for line in lines:
        if line.startswith("{"):
            entries.append(orjson.loads(line))
    # Everything the server wrote is JSON, except what TensorFlow's C++ side prints in the workers.
    assert len(entries) >= len([line for line in lines if "tapeserve" in line or "uvicorn" in line]) > 0
    access = [e for e in entries if e["logger"] == "tapeserve.access"]
    mine = [e for e in access if e.get("request_id") == "live-log-check"]
    assert len(mine) == 1
    assert mine[0]["route"] == "/v1/gradient" and mine[0]["status"] == 200 and mine[0]["duration_ms"] > 0
    assert any(e["status"] == 401 for e in access)
    text = ops_server.log()
    # The marker's "." keeps it from ever matching inside a hex request id by chance.
    for secret in (API_KEY, "not-the-key", str(MARKER_VALUE)):
        assert secret not in text, secret


def test_the_sdk_sends_its_key_and_maps_refusals(ops_server: LiveServer) -> None:
    import numpy as np

    import service.client as ts

    with ts.Client(ops_server.url, api_key=API_KEY) as client:
        np.testing.assert_array_equal(client.gradient("sum(x**2)", x=[1.0, -3.0])["x"], [2.0, -6.0])
    with ts.Client(ops_server.url, api_key="wrong") as client, pytest.raises(ts.Unauthorized) as info:
        client.gradient("sum(x**2)", x=[1.0])
    assert info.value.status == 401 and "not valid" in str(info.value)
