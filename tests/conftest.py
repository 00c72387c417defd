"""Shared test helpers: free ports and a real tapeserve server in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The refusal brake (service/api/brake.py) paces a client's 4xx answers to 10 a second after 20; the
# suite's hostile, fuzzing and schema tests send thousands of refused requests from one address on
# purpose, so servers and apps in tests run without it unless a test turns it on
# (tests/api/test_brake.py does, with its own small numbers).
os.environ.setdefault("TAPESERVE_REFUSAL_RATE", "0")
# Ceilings, not expectations: the waits return as soon as the server answers (seconds when idle). A
# loaded 2-core machine has taken ~55 s to start one TensorFlow worker.
STARTUP_CEILING_S = 180.0
READY_CEILING_S = 240.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LiveServer:
    """A `tapeserve serve` subprocess (uvicorn + a real worker pool) on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = READY_CEILING_S) -> None:
        """Block until /readyz says a worker is warm."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"no worker became ready within {timeout_s} s:\n{self.log()}")


def start_server(tmp_dir: Path, env: Mapping[str, str] | None = None) -> LiveServer:
    """Start a server with one worker and wait until it answers /healthz (workers may still be warming)."""
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    full_env = {**os.environ, "TAPESERVE_WORKERS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + STARTUP_CEILING_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=2.0).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    stop_server(server)
    raise RuntimeError(f"server did not answer /healthz within {STARTUP_CEILING_S} s:\n{server.log()}")


def stop_server(server: LiveServer) -> None:
    """SIGTERM (graceful: the pool drains and stops its workers), then SIGKILL if it hangs."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=10)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One real server for the whole session (one worker: TF costs ~4 s and ~500 MB per process)."""
    server = start_server(tmp_path_factory.mktemp("live-server"))
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="session")
def ready_server(live_server: LiveServer) -> LiveServer:
    """The live server once a worker is warm."""
    live_server.wait_ready()
    return live_server
