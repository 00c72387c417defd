"""API keys, rate limits and CORS on the in-process app (fake pool: these are about the HTTP layer)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api import Settings, create_app
from service.api.security import TokenBuckets, is_protected, key_digests
from tests.api.fakes import FakePool

KEY = "k3y-alpha"
OTHER_KEY = "second-key"
GRAD = {"expression": "sum(x**2)", "variables": {"x": [1.0, 2.0]}}
UM_INFO = {
    "name": "expression",
    "config": {"inputs": [{"name": "x", "size": 2}], "outputs": [{"expression": "sum(x**2)", "size": 1}]},
}


def _client(**settings: Any) -> TestClient:
    return TestClient(create_app(Settings(**settings), pool=FakePool()), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def keyed() -> Iterator[TestClient]:
    with _client(api_keys=f"{KEY}, {OTHER_KEY}") as client:
        yield client


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/gradient", GRAD),
        ("POST", "/gradient", GRAD),
        ("GET", "/v1/functions", None),
        ("POST", "/v1/model/describe", {"model": {"input_shape": [2], "layers": []}}),
        ("POST", "/v1/nonexistent", {}),
        ("GET", "/metrics", None),
    ],
)
def test_protected_routes_need_a_key(keyed: TestClient, method: str, path: str, body: Any) -> None:
    r = keyed.request(method, path, json=body)
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["www-authenticate"].startswith("Bearer")
    problem = r.json()
    assert problem["code"] == "unauthorized"
    assert problem["status"] == 401
    assert "Authorization: Bearer" in problem["detail"]
    assert problem["instance"] == path
    assert problem["request_id"] == r.headers["x-request-id"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": f"Bearer {KEY[:-1]}"},
        {"Authorization": "Bearer "},
        {"Authorization": KEY},
    ],
)
def test_wrong_keys_are_refused(keyed: TestClient, headers: dict[str, str]) -> None:
    r = keyed.post("/v1/gradient", json=GRAD, headers=headers)
    assert r.status_code == 401, r.text
    assert r.json()["code"] == "unauthorized"
    assert "not valid" in r.json()["detail"]


@pytest.mark.parametrize("key", [KEY, OTHER_KEY])
def test_each_configured_key_is_accepted(keyed: TestClient, key: str) -> None:
    r = keyed.post("/v1/gradient", json=GRAD, headers=_bearer(key))
    assert r.status_code == 200, r.text
    assert r.json()["gradient"] == {"x": [0.0, 0.0]}  # the fake pool's zeros: the request reached the pool
    assert (
        keyed.post("/v1/gradient", json=GRAD, headers={"authorization": f"bearer {key}"}).status_code == 200
    )


def test_a_refused_request_never_reaches_the_pool() -> None:
    pool = FakePool()
    with TestClient(create_app(Settings(api_keys=KEY), pool=pool), raise_server_exceptions=False) as client:
        assert client.post("/v1/gradient", json=GRAD).status_code == 401
        assert pool.jobs == []
        assert client.post("/v1/gradient", json=GRAD, headers=_bearer(KEY)).status_code == 200
        assert len(pool.jobs) == 1


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json", "/docs"])
def test_probes_and_docs_stay_open(keyed: TestClient, path: str) -> None:
    assert keyed.get(path).status_code == 200


def test_unknown_paths_outside_the_api_are_404_not_401(keyed: TestClient) -> None:
    r = keyed.get("/nothing-here")
    assert r.status_code == 404
    assert r.json()["code"] == "not_found"


def test_metrics_public_opens_only_metrics() -> None:
    with _client(api_keys=KEY, metrics_public=True) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/v1/functions").status_code == 401


def test_no_keys_means_no_authentication() -> None:
    with _client() as client:
        assert client.post("/v1/gradient", json=GRAD).status_code == 200
        assert client.get("/metrics").status_code == 200


def test_umbridge_refusal_keeps_the_protocol_envelope(keyed: TestClient) -> None:
    r = keyed.post("/umbridge/InputSizes", json=UM_INFO)
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/json"
    assert r.headers["www-authenticate"].startswith("Bearer")
    error = r.json()["error"]
    assert error["type"] == "InvalidInput"
    assert "API key" in error["message"]
    assert keyed.get("/umbridge/Info").status_code == 401
    ok = keyed.post("/umbridge/InputSizes", json=UM_INFO, headers=_bearer(KEY))
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"inputSizes": [2]}


def test_body_of_a_refused_request_is_not_read() -> None:
    # Over the body limit AND without a key: the key is checked first, so the answer is 401, not 413.
    with _client(api_keys=KEY, max_body_bytes=1024) as client:
        r = client.post("/v1/gradient", content=b"x" * 10_000, headers={"Content-Type": "application/json"})
        assert r.status_code == 401


def test_hashed_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    digest = hashlib.sha256(b"from-the-file").hexdigest()
    path.write_text(f"# deploy keys\n{digest.upper()}  # ci\n\n")
    with _client(api_keys_file=path) as client:
        assert client.post("/v1/gradient", json=GRAD, headers=_bearer("from-the-file")).status_code == 200
        # The file holds digests: sending the digest itself as a key must not work.
        assert client.post("/v1/gradient", json=GRAD, headers=_bearer(digest)).status_code == 401


def test_malformed_keys_file_stops_start_up_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(f"{hashlib.sha256(b'a').hexdigest()}\nplaintext-secret-key\n")
    with pytest.raises(ValidationError) as info:
        Settings(api_keys_file=path)
    assert "line 2" in str(info.value)
    assert "plaintext-secret-key" not in str(info.value)
    with pytest.raises(ValidationError, match="cannot read"):
        Settings(api_keys_file=tmp_path / "missing.txt")


def test_keys_are_never_in_the_settings_repr() -> None:
    settings = Settings(api_keys=f"{KEY},{OTHER_KEY}")
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())
    assert settings.api_key_digests() == key_digests(f"{KEY},{OTHER_KEY}", None)
    assert len(settings.api_key_digests()) == 2


def test_is_protected_table() -> None:
    for path in ("/v1/gradient", "/v1/x/y", "/umbridge/Info", "/gradient", "/metrics"):
        assert is_protected(path, metrics_public=False), path
    for path in (
        "/",
        "/docs",
        "/openapi.json",
        "/healthz",
        "/readyz",
        "/static/app.js",
        "/v1x",
        "/gradients",
    ):
        assert not is_protected(path, metrics_public=False), path
    assert not is_protected("/metrics", metrics_public=True)


# ------------------------------------------------------------------------------------ rate limits


def test_token_bucket_arithmetic() -> None:
    buckets = TokenBuckets(rate=2.0, burst=3)
    assert [buckets.take(b"k", now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take(b"k", now=100.0) == pytest.approx(0.5)  # 1 token at 2/s
    assert buckets.take(b"k", now=100.25) == pytest.approx(0.25)  # half a token refilled
    assert buckets.take(b"k", now=100.5) == 0.0  # one full token after 0.5 s
    assert buckets.take(b"other", now=100.5) == 0.0  # buckets are per key
    assert [buckets.take(b"k", now=1000.0) for _ in range(4)][-1] > 0  # refill caps at the burst


def test_rate_limit_gives_429_with_retry_after_per_key() -> None:
    # 0.01/s: no token comes back during the test, so the outcome does not depend on timing.
    with _client(api_keys=f"{KEY},{OTHER_KEY}", rate_limit=0.01, rate_limit_burst=2) as client:
        for _ in range(2):
            assert client.post("/v1/gradient", json=GRAD, headers=_bearer(KEY)).status_code == 200
        r = client.post("/v1/gradient", json=GRAD, headers=_bearer(KEY))
        assert r.status_code == 429
        assert r.headers["content-type"] == "application/problem+json"
        assert int(r.headers["retry-after"]) == 100  # one token at 0.01/s
        problem = r.json()
        assert problem["code"] == "rate_limited" and problem["retry_after"] == 100
        assert "0.01 requests per second" in problem["detail"]
        # Another key has its own bucket; probes are never limited.
        assert client.post("/v1/gradient", json=GRAD, headers=_bearer(OTHER_KEY)).status_code == 200
        assert client.get("/healthz").status_code == 200
        # Wrong keys get 401 before the limiter, so they cannot drain a real key's bucket.
        assert client.post("/v1/gradient", json=GRAD, headers=_bearer("nope")).status_code == 401


def test_rate_limit_without_keys_is_per_client_address() -> None:
    with _client(rate_limit=0.01, rate_limit_burst=1) as client:
        assert client.get("/v1/functions").status_code == 200
        assert client.get("/v1/functions").status_code == 429


def test_rate_limit_under_umbridge_keeps_the_envelope() -> None:
    with _client(api_keys=KEY, rate_limit=0.01, rate_limit_burst=1) as client:
        assert client.get("/umbridge/Info", headers=_bearer(KEY)).status_code == 200
        r = client.get("/umbridge/Info", headers=_bearer(KEY))
        assert r.status_code == 429
        assert r.headers["retry-after"] == "100"
        assert "error" in r.json()


# ------------------------------------------------------------------------------------ CORS


def test_cors_is_off_by_default(keyed: TestClient) -> None:
    r = keyed.get("/healthz", headers={"Origin": "https://example.org"})
    assert "access-control-allow-origin" not in r.headers
    preflight = keyed.options(
        "/v1/gradient",
        headers={"Origin": "https://example.org", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_allows_configured_origins_only() -> None:
    with _client(api_keys=KEY, cors_origins="https://app.example.org, https://b.example.org") as client:
        preflight = client.options(
            "/v1/gradient",
            headers={
                "Origin": "https://app.example.org",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200  # answered without a key: preflights carry none
        assert preflight.headers["access-control-allow-origin"] == "https://app.example.org"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        r = client.post(
            "/v1/gradient", json=GRAD, headers={"Origin": "https://b.example.org", **_bearer(KEY)}
        )
        assert r.headers["access-control-allow-origin"] == "https://b.example.org"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        refused = client.post("/v1/gradient", json=GRAD, headers={"Origin": "https://b.example.org"})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == "https://b.example.org"
        other = client.options(
            "/v1/gradient",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert other.status_code == 400
        assert "access-control-allow-origin" not in other.headers
