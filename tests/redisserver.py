"""Debian's redis-server on a free loopback port: the rate-limit store in tests (`make test` installs it)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port

# A ceiling, not an expectation: redis-server answers within milliseconds when idle.
_START_CEILING_S = 30.0


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def redis_binary() -> str:
    found = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if Path(p).exists()), None
    )
    if found is None:
        pytest.fail("redis-server is missing: `make test` installs Debian's (apt-get install redis-server)")
    return found


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(tmp_dir: Path, port: int | None = None) -> RedisServer:
    """A throwaway redis-server: loopback only, no persistence, its files in ``tmp_dir``."""
    port = free_port() if port is None else port
    log_path = tmp_dir / f"redis-{port}.log"
    command = [
        redis_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(tmp_dir),
        "--daemonize", "no",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = RedisServer(process, port, log_path)
    deadline = time.monotonic() + _START_CEILING_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}:\n{log_path.read_text()}")
        if _answers_ping(port):
            return server
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"redis-server did not answer within {_START_CEILING_S} s:\n{log_path.read_text()}")
