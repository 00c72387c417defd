"""docker-compose.yml's topology without containers: two `tapeserve serve` replicas (one worker each)
behind Debian's nginx running deploy/nginx/nginx.conf.template, all on 127.0.0.1.

Checks that load spreads over both replicas, that streamed training passes line by line, that nginx's
own refusals are problem+json, and that killing a replica leaves requests succeeding. The tests share
one topology and run in file order: the failover test kills the replicas, so it comes last.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import LiveServer, start_server, stop_server
from tests.deploy.support import Nginx, nginx_binary, start_nginx

# Small enough that the body-limit test stays quick; the same value configures nginx and replicas.
MAX_BODY_BYTES = 1 << 20

_UPSTREAM = re.compile(r'upstream="([^"]*)"')


@dataclass
class Topology:
    replicas: list[LiveServer]
    nginx: Nginx

    def address(self, replica: LiveServer) -> str:
        return replica.url.removeprefix("http://")

    def served_by(self, lines: list[str]) -> list[list[str]]:
        """For each access-log line, the replicas nginx tried, in order."""
        out = []
        for line in lines:
            match = _UPSTREAM.search(line)
            assert match, f"no upstream in nginx's log line {line!r}"
            out.append([part.strip() for part in match[1].split(",")])
        return out


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    nginx_binary()  # skip before paying for two servers
    tmp = tmp_path_factory.mktemp("topology")
    env = {"TAPESERVE_MAX_BODY_BYTES": str(MAX_BODY_BYTES), "TAPESERVE_LOG_FORMAT": "text"}
    replicas: list[LiveServer] = []
    nginx: Nginx | None = None
    try:
        for _ in range(2):
            replicas.append(start_server(tmp, env))
        for replica in replicas:
            replica.wait_ready()
        # nginx's workers run as an unprivileged user: they must be able to reach the prefix.
        prefix = tmp / "nginx"
        prefix.mkdir()
        for path in (prefix, *prefix.parents):
            if path == Path("/tmp") or path == Path("/"):
                break
            path.chmod(path.stat().st_mode | 0o011)
        nginx = start_nginx(
            prefix, [r.url.removeprefix("http://") for r in replicas], max_body_bytes=MAX_BODY_BYTES
        )
        yield Topology(replicas, nginx)
    finally:
        if nginx is not None:
            nginx.stop()
        for replica in replicas:
            stop_server(replica)


def _jobs(replica: LiveServer) -> int:
    """Jobs the replica's workers have finished (from /readyz): the replica's own count of its work."""
    body = httpx.get(f"{replica.url}/readyz", timeout=10.0).json()
    return sum(int(worker["jobs"]) for worker in body["pool"]["workers"])


def _gradient(client: httpx.Client, x: np.ndarray) -> httpx.Response:
    return client.post(
        "/v1/gradient",
        json={"expression": "sum(sin(x) * x)", "variables": {"x": x.tolist()}, "dtype": "float64"},
    )


def _check_gradient(response: httpx.Response, x: np.ndarray) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    # Closed forms: d/dx sum(x sin x) = sin x + x cos x.
    np.testing.assert_allclose(body["value"], np.sum(np.sin(x) * x), rtol=1e-12)
    np.testing.assert_allclose(body["gradient"]["x"], np.sin(x) + x * np.cos(x), rtol=1e-12, atol=1e-15)


def test_requests_spread_over_both_replicas(topology: Topology) -> None:
    before = [_jobs(r) for r in topology.replicas]
    logged = len(topology.nginx.access_lines())
    rng = np.random.default_rng(0)
    requests = 20
    with httpx.Client(base_url=topology.nginx.url, timeout=60.0) as client:
        for _ in range(requests):
            x = rng.normal(size=5)
            _check_gradient(_gradient(client, x), x)
    lines = [line for line in topology.nginx.access_lines()[logged:] if "/v1/gradient" in line]
    assert len(lines) == requests
    tried = topology.served_by(lines)
    assert all(len(t) == 1 for t in tried), "no request should need a second replica while both are up"
    counts = Counter(t[0] for t in tried)
    # Sequential requests leave no connection open, so least_conn ties and falls back to round robin.
    assert set(counts) == {topology.address(r) for r in topology.replicas}, counts
    assert min(counts.values()) >= requests // 4, counts
    # The replicas' own counters agree that each did work.
    after = [_jobs(r) for r in topology.replicas]
    for replica, old, new in zip(topology.replicas, before, after, strict=True):
        assert new - old >= counts[topology.address(replica)], (before, after, counts)


TRAIN = {
    "model": {
        "input_shape": [8],
        "seed": 3,
        "layers": [{"type": "dense", "units": 64, "activation": "tanh"}, {"type": "dense", "units": 1}],
    },
    "loss": "mse",
    "optimizer": {"type": "adam", "learning_rate": 0.01},
}


def test_streamed_training_arrives_line_by_line(topology: Topology) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 8))
    request = {**TRAIN, "x": x.tolist(), "y": (x @ rng.normal(size=(8, 1))).tolist()}
    chunks, every = 6, 200
    with httpx.Client(base_url=topology.nginx.url, timeout=120.0) as client:
        plain = client.post("/v1/model/train-step", json={**request, "steps": chunks * every})
        assert plain.status_code == 200, plain.text
        before = sum(_jobs(r) for r in topology.replicas)
        lines: list[dict[str, Any]] = []
        jobs_at_first_line = None
        with client.stream(
            "POST",
            "/v1/model/train-step",
            json={**request, "steps": chunks * every, "stream": True, "progress_every": every},
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/x-ndjson")
            for line in response.iter_lines():
                if not line:
                    continue
                lines.append(json.loads(line))
                if jobs_at_first_line is None:
                    # Each chunk is one pool job. Had nginx buffered the stream, this first line would
                    # only arrive once every chunk had run; unbuffered, most are still to come.
                    jobs_at_first_line = sum(_jobs(r) for r in topology.replicas) - before
    assert [line["type"] for line in lines] == ["progress"] * chunks + ["result"]
    assert [line["step"] for line in lines[:-1]] == [every * (i + 1) for i in range(chunks)]
    assert jobs_at_first_line is not None and jobs_at_first_line < chunks, jobs_at_first_line
    # Chunked through nginx, the numbers are those of one plain call (the same replica code, same seed).
    result = lines[-1]
    for streamed, whole in zip(result["weights"], plain.json()["weights"], strict=True):
        np.testing.assert_allclose(np.asarray(streamed), np.asarray(whole), rtol=1e-6, atol=1e-7)


def test_bodies_over_the_limit_get_problem_json_from_nginx(topology: Topology) -> None:
    big = json.dumps({"expression": "x", "variables": {"x": [0.0] * (MAX_BODY_BYTES // 4)}})
    assert len(big) > MAX_BODY_BYTES
    with httpx.Client(base_url=topology.nginx.url, timeout=60.0) as client:
        response = client.post("/v1/gradient", content=big, headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["code"] == "payload_too_large" and problem["status"] == 413
        assert problem["allowed"] == MAX_BODY_BYTES and problem["limit"] == "max_body_bytes"
        assert str(MAX_BODY_BYTES) in problem["detail"]
        # The replicas' own 413 has the same members, so clients see one format whoever refuses.
        direct = httpx.post(
            f"{topology.replicas[0].url}/v1/gradient",
            content=big,
            headers={"Content-Type": "application/json"},
            timeout=60.0,
        )
        assert direct.status_code == 413
        assert set(problem) - {"instance"} <= set(direct.json()), (problem, direct.json())
        # Under /umbridge, the protocol's own envelope.
        response = client.post(
            "/umbridge/Evaluate", content=big, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "InvalidInput"
        # A body just under the limit goes through nginx to a replica.
        x = np.linspace(-1.0, 1.0, 1000)
        _check_gradient(_gradient(client, x), x)


def test_killing_a_replica_leaves_requests_succeeding(topology: Topology) -> None:
    victim, survivor = topology.replicas
    logged = len(topology.nginx.access_lines())
    rng = np.random.default_rng(2)
    inputs = [rng.normal(size=4) for _ in range(40)]
    responses: list[httpx.Response | httpx.HTTPError] = []
    some_done = threading.Event()

    def send_all() -> None:
        with httpx.Client(base_url=topology.nginx.url, timeout=60.0) as client:
            for i, x in enumerate(inputs):
                try:
                    responses.append(_gradient(client, x))
                except httpx.HTTPError as error:  # recorded, and asserted on below
                    responses.append(error)
                if i == 9:
                    some_done.set()

    sender = threading.Thread(target=send_all)
    sender.start()
    try:
        assert some_done.wait(timeout=120.0), "the first requests did not complete"
        # SIGKILL: no graceful stop, connections just die (its worker follows via PDEATHSIG).
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait(timeout=30)
    finally:
        sender.join(timeout=300)
    assert not sender.is_alive()
    assert len(responses) == len(inputs)
    for x, response in zip(inputs, responses, strict=True):
        assert isinstance(response, httpx.Response), repr(response)
        _check_gradient(response, x)

    # After the kill, requests that nginx first sent to the dead replica were passed on.
    lines = [line for line in topology.nginx.access_lines()[logged:] if "/v1/gradient" in line]
    tried = topology.served_by(lines)
    dead, alive = topology.address(victim), topology.address(survivor)
    assert any(t[:1] == [dead] and t[-1] == alive for t in tried[10:]), tried
    assert all(t[-1] == alive for t in tried[11:]), tried

    # With every replica gone, nginx answers problem+json that clients treat as retryable.
    stop_server(survivor)
    response = httpx.post(f"{topology.nginx.url}/v1/gradient", json={"expression": "1"}, timeout=60.0)
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "overloaded" and response.headers["retry-after"] == "1"
