"""Schemathesis against the committed openapi/openapi.json, on a real server with a real worker.

Every generated request must get a documented status code, a body valid against the documented
schema and never a 5xx. Bounded to a few examples per operation so the file runs in about a minute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import LiveServer
from tests.ops.conftest import API_KEY, OPS_ENV, restarts

ROOT = Path(__file__).resolve().parents[2]
# Streaming train-steps and /v1/step are included: the ops server caps steps at 20, so each is quick.
schema = schemathesis.openapi.from_path(ROOT / "openapi" / "openapi.json")

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Per operation: 17 operations x 12 examples stay under two minutes with one worker on a busy machine.
_EXAMPLES = 12

pytestmark = pytest.mark.timeout(600)


# A deadline shorter than the computation is the client's choice and its documented answer is 504;
# below this many seconds a request's own timeout_s makes a 504 expected rather than a server error.
_SHORT_DEADLINE_S = 5.0


@pytest.fixture(scope="module", autouse=True)
def _no_worker_crashes(ops_server: LiveServer) -> object:
    with httpx.Client(base_url=ops_server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        before = restarts(client)
        yield
        after = restarts(client)
    # Timeouts the generated requests asked for replace the worker (cause "timeout"); nothing else may.
    for worker, causes in after.items():
        for cause in ("crash", "memory"):
            assert causes[cause] == before.get(worker, {}).get(cause, 0), f"worker {worker}: {cause}"


def _asked_for_a_short_deadline(case: schemathesis.Case) -> bool:
    body = case.body if isinstance(case.body, dict) else {}
    timeout = body.get("timeout_s")
    return isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout < _SHORT_DEADLINE_S


def _deadline_passed(case: schemathesis.Case, response: Any) -> bool:
    """A 504 ``timeout`` problem is the documented answer to a deadline that passed: a short one the
    request asked for, or the server's own, which a cold model compile can reach on a loaded machine."""
    if response.status_code != 504 or response.json().get("code") != "timeout":
        return False
    return _asked_for_a_short_deadline(case) or response.elapsed >= 0.9 * float(
        OPS_ENV["TAPESERVE_REQUEST_TIMEOUT_S"]
    )


@schema.parametrize()
@settings(
    max_examples=_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_api_conforms_to_its_schema(case: schemathesis.Case, ops_server: LiveServer) -> None:
    response = case.call(base_url=ops_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    expected_timeout = _deadline_passed(case, response)
    case.validate_response(
        response,
        checks=[check for check in CHECKS if not (expected_timeout and check is not_a_server_error)],
    )
