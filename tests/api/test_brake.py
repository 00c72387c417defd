"""The refusal brake: a client that keeps being refused is paced; successes are never delayed."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from service.api import Settings, create_app
from service.api.brake import MAX_DELAY_S, RefusalBuckets
from tests.api.fakes import FakePool


def test_refusals_pass_at_once_up_to_the_burst_then_queue_at_the_rate() -> None:
    buckets = RefusalBuckets(rate=10.0, burst=3)
    waits = [buckets.charge("a", now=100.0) for _ in range(6)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3:] == pytest.approx([0.1, 0.2, 0.3])  # each queued refusal waits its turn
    assert buckets.charge("b", now=100.0) == 0.0  # another client has its own allowance
    # Time refills the allowance: a second later the debt of 3 is paid and the burst is back.
    assert buckets.charge("a", now=101.0) == 0.0


def test_a_refusal_waits_at_most_the_ceiling_however_long_the_queue() -> None:
    buckets = RefusalBuckets(rate=10.0, burst=1)
    waits = [buckets.charge("a", now=0.0) for _ in range(100)]
    assert max(waits) == pytest.approx(MAX_DELAY_S)
    # The debt is bounded too: a client that stops for the ceiling's time is answered at once again.
    assert buckets.charge("a", now=MAX_DELAY_S + 0.1 + 1 / 10.0) == 0.0


def _delayed(client: TestClient) -> int:
    text = client.get("/metrics").text
    found = re.search(r"^tapeserve_refusals_delayed_seconds_count (\S+)$", text, re.MULTILINE)
    assert found, "the brake's histogram is exported"
    return int(float(found.group(1)))


def test_a_looping_client_s_refusals_are_held_and_its_successes_are_not() -> None:
    settings = Settings(refusal_rate=50.0, refusal_burst=3)
    with TestClient(create_app(settings, pool=FakePool()), raise_server_exceptions=False) as client:
        bad = {"expression": "sum(x)", "variables": {"x": [1.0]}, "timeout_s": 0.001}  # under the floor
        good = {"expression": "sum(x)", "variables": {"x": [1.0]}}
        for _ in range(8):
            response = client.post("/v1/gradient", json=bad)
            assert response.status_code == 422 and response.json()["code"] == "invalid_request"
        held = _delayed(client)
        assert held >= 4  # 8 refusals against a burst of 3: the later ones waited
        for _ in range(5):
            assert client.post("/v1/gradient", json=good).status_code == 200
        assert _delayed(client) == held  # successes are neither delayed nor counted


def test_the_brake_is_off_at_zero() -> None:
    settings = Settings(refusal_rate=0.0)
    with TestClient(create_app(settings, pool=FakePool()), raise_server_exceptions=False) as client:
        for _ in range(10):
            client.post("/v1/gradient", content=b"{", headers={"content-type": "application/json"})
        assert "tapeserve_refusals_delayed_seconds_count 0.0" in client.get("/metrics").text
