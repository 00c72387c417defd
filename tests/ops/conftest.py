"""One real server for the ops tests: API keys on, JSON logs, small limits so generated inputs stay cheap."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, start_server, stop_server

API_KEY = "ops-test-key-6f1c"
# Small enough that no generated request can keep the single worker busy for long (a timeout would
# be a 504, which the fuzzers count as a failure), large enough for every feature to work.
OPS_ENV = {
    "TAPESERVE_API_KEYS": API_KEY,
    "TAPESERVE_LOG_FORMAT": "json",
    "TAPESERVE_MAX_INPUT_ELEMENTS": "10000",
    "TAPESERVE_MAX_TENSOR_ELEMENTS": "1000000",
    "TAPESERVE_MAX_BATCH": "1000",
    "TAPESERVE_MAX_PARAMS": "20000",
    "TAPESERVE_MAX_LAYERS": "8",
    "TAPESERVE_MAX_STEPS": "20",
    "TAPESERVE_MAX_SYNTAX_NODES": "2000",
    "TAPESERVE_MAX_EXPRESSION_CHARS": "2000",
    "TAPESERVE_REQUEST_TIMEOUT_S": "30",  # named here: test_schemathesis reads it
}


@pytest.fixture(scope="session")
def ops_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("ops-server"), OPS_ENV)
    try:
        server.wait_ready()
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="session")
def ops_client(ops_server: LiveServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=ops_server.url, headers=headers, timeout=60.0) as client:
        yield client


def restarts(client: httpx.Client) -> dict[str, Any]:
    """Every worker's restarts by cause, from /readyz."""
    workers = client.get("/readyz").json()["pool"]["workers"]
    return {str(w["id"]): w["restarts_by_cause"] for w in workers}
