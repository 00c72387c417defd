"""HTTP behaviour of a real server (uvicorn, one real worker): probes, wire limits, no TF in the API."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx

from tests.conftest import LiveServer


def test_healthz_needs_no_worker(live_server: LiveServer) -> None:
    response = httpx.get(f"{live_server.url}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_reports_the_pool(ready_server: LiveServer) -> None:
    response = httpx.get(f"{ready_server.url}/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    workers = body["pool"]["workers"]
    assert len(workers) == 1
    assert workers[0]["device"] == "cpu"


def test_not_found_and_method_not_allowed(live_server: LiveServer) -> None:
    response = httpx.get(f"{live_server.url}/nope")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "not_found"
    response = httpx.delete(f"{live_server.url}/v1/gradient")
    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"


def test_body_over_the_limit_by_content_length(live_server: LiveServer) -> None:
    body = b'{"expression": "x", "pad": "' + b"x" * (16 * 1024 * 1024) + b'"}'
    response = httpx.post(
        f"{live_server.url}/v1/gradient",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
    assert httpx.get(f"{live_server.url}/healthz").status_code == 200


def test_body_over_the_limit_while_streaming(live_server: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"expression": "x", "pad": "'
        for _ in range(17):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    response = httpx.post(
        f"{live_server.url}/v1/gradient",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"


def test_truncated_request_does_not_hurt(live_server: LiveServer) -> None:
    address = urlparse(live_server.url)
    with socket.create_connection((address.hostname, address.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/gradient HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        sock.sendall(b'Content-Length: 1000\r\n\r\n{"expression": ')
    assert httpx.get(f"{live_server.url}/healthz").status_code == 200


def test_api_process_has_no_tensorflow_after_a_computation(ready_server: LiveServer) -> None:
    response = httpx.post(
        f"{ready_server.url}/v1/gradient",
        json={"expression": "x**2", "variables": {"x": 3.0}},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    # TensorFlow's shared libraries would be mapped into the API process had it been imported there.
    maps = Path(f"/proc/{ready_server.process.pid}/maps").read_text()
    assert "tensorflow" not in maps
    assert "_pywrap" not in maps
