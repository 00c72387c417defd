"""In-process app fixtures: the real app with a fake worker pool, for tests about one handler."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.api import Settings, create_app
from tests.api.fakes import FakePool

SMALL_LIMITS = {
    "max_body_bytes": 64 * 1024,
    "max_expression_chars": 2_000,
    "max_input_elements": 1_000,
    "max_tensor_elements": 100_000,
    "max_batch": 100,
    "request_timeout_s": 10.0,
}


@pytest.fixture(scope="module")
def fake_pool() -> FakePool:
    return FakePool()


@pytest.fixture(scope="module")
def client(fake_pool: FakePool) -> Iterator[TestClient]:
    """The real app (small limits) around a fake pool, lifespan included."""
    app = create_app(Settings(**SMALL_LIMITS), pool=fake_pool)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(autouse=True)
def _reset_fake_pool(request: pytest.FixtureRequest) -> None:
    if "fake_pool" in request.fixturenames:
        pool: FakePool = request.getfixturevalue("fake_pool")
        pool.error = None
        pool.is_ready = True
        pool.jobs.clear()
        pool.calls.clear()
