"""docker-compose.yml's balancer without containers: Debian's haproxy running deploy/haproxy/haproxy.cfg
as it is in the repo, in front of three replicas on 127.0.0.1: a real `tapeserve serve` (one worker),
and two stand-ins (tests/deploy/standin.py) whose readiness the tests set, one ready, one up but not.

Checks that the not-ready replica gets no request, that a replica that stops being ready is taken out
and comes back, that streamed training and the replicas' 413 pass through, that killing a replica
moves the traffic without a failed request, and the balancer's own answer when no replica is ready.
The tests share one topology and run in file order: the kill test, which ends it, comes last.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import LiveServer, start_server, stop_server
from tests.deploy.support import (
    HAPROXY_CONFIG,
    HAProxy,
    StandIn,
    haproxy_binary,
    start_haproxy,
    start_standin,
    wait_for,
)

# Small enough that the body-limit test stays quick.
MAX_BODY_BYTES = 1 << 20
# A request's line in HAProxy's log (haproxy.cfg's log-format):
#   ... public replicas/r1 0/0/0/3/3 200 ... retries=0 request_id=... "POST /v1/gradient HTTP/1.1"
_LOG = re.compile(r" public replicas/(\S+) \S+ (\d+) .* retries=(\+?\d+) .*\"(\S+) (\S+) HTTP/[\d.]+\"$")


@dataclass
class Topology:
    real: LiveServer
    ready: StandIn
    starting: StandIn
    haproxy: HAProxy
    ready_now: bool = True

    def served(self, since: int, path: str) -> list[str]:
        """The replica that answered each request for ``path`` logged after line ``since``."""
        out = []
        for line in self.haproxy.log_lines()[since:]:
            match = _LOG.search(line)
            if match and match[5] == path:
                out.append(match[1])
        return out

    def wait_states(self, **expected: str) -> None:
        """Until HAProxy's own view of each named server starts with the given word (UP, DOWN)."""

        def reached() -> bool:
            states = self.haproxy.server_states()
            return all(states[name].split()[0] == state for name, state in expected.items())

        wait_for(reached, f"haproxy's server states {expected}")

    def standin_ready(self, ready: bool) -> None:
        """Sets the ready stand-in's readiness and waits until HAProxy has seen it (only if it changes:
        the tests that need the real replica alone share one wait)."""
        if self.ready_now != ready:
            self.ready.set_ready(ready)
            self.ready_now = ready
        self.wait_states(r1="UP", r2="UP" if ready else "DOWN", r3="DOWN")


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    haproxy_binary()  # skip before paying for a server
    tmp = tmp_path_factory.mktemp("haproxy-topology")
    env = {"TAPESERVE_MAX_BODY_BYTES": str(MAX_BODY_BYTES), "TAPESERVE_LOG_FORMAT": "text"}
    real: LiveServer | None = None
    standins: list[StandIn] = []
    haproxy: HAProxy | None = None
    try:
        real = start_server(tmp, env)
        standins = [start_standin("r2", ready=True), start_standin("r3", ready=False)]
        real.wait_ready()
        servers = {"r1": real.url.removeprefix("http://")}
        servers.update(r2=standins[0].address, r3=standins[1].address)
        haproxy = start_haproxy(tmp / "haproxy", servers)
        topology = Topology(real, standins[0], standins[1], haproxy)
        # Every server starts UP and leaves at its first failed check.
        topology.wait_states(r1="UP", r2="UP", r3="DOWN")
        yield topology
    finally:
        if haproxy is not None:
            haproxy.stop()
        for standin in standins:
            standin.stop()
        if real is not None:
            stop_server(real)


def _gradient(client: httpx.Client, x: np.ndarray) -> httpx.Response:
    return client.post(
        "/v1/gradient",
        json={"expression": "sum(sin(x) * x)", "variables": {"x": x.tolist()}, "dtype": "float64"},
    )


def _check(response: httpx.Response, x: np.ndarray) -> str:
    """Which replica answered ("r2"/"r3" for stand-ins, "r1" for tapeserve, whose answer is checked)."""
    assert response.status_code == 200, response.text
    if "x-standin" in response.headers:
        # HAProxy told the replica who the client is, and gave the request an id.
        seen = response.json()
        assert seen["forwarded_for"] == "127.0.0.1" and seen["request_id"], seen
        return str(response.headers["x-standin"])
    body = response.json()
    # Closed forms: d/dx sum(x sin x) = sin x + x cos x.
    np.testing.assert_allclose(body["value"], np.sum(np.sin(x) * x), rtol=1e-12)
    np.testing.assert_allclose(body["gradient"]["x"], np.sin(x) + x * np.cos(x), rtol=1e-12, atol=1e-15)
    return "r1"


def _send(topology: Topology, count: int, seed: int) -> Counter[str]:
    rng = np.random.default_rng(seed)
    answered: Counter[str] = Counter()
    with httpx.Client(base_url=topology.haproxy.url, timeout=60.0) as client:
        for _ in range(count):
            x = rng.normal(size=5)
            answered[_check(_gradient(client, x), x)] += 1
    return answered


def test_the_replica_that_is_not_ready_gets_no_request(topology: Topology) -> None:
    topology.standin_ready(True)
    logged = len(topology.haproxy.log_lines())
    before = topology.ready.requests()
    requests = 20
    answered = _send(topology, requests, seed=0)
    # Sequential requests leave no connection busy, so leastconn ties and takes turns.
    assert set(answered) == {"r1", "r2"} and min(answered.values()) >= requests // 4, answered
    assert topology.starting.requests() == 0
    assert topology.ready.requests() - before == answered["r2"]
    # HAProxy's log agrees, and no request needed a second try.
    assert Counter(topology.served(logged, "/v1/gradient")) == answered
    assert all(m[3] == "0" for m in map(_LOG.search, topology.haproxy.log_lines()[logged:]) if m)


def test_a_replica_that_stops_being_ready_leaves_and_comes_back(topology: Topology) -> None:
    topology.standin_ready(False)
    before = topology.ready.requests()
    assert _send(topology, 10, seed=1) == {"r1": 10}
    assert topology.ready.requests() == before
    # Ready again: it takes turns with the real replica.
    topology.standin_ready(True)
    assert _send(topology, 10, seed=2)["r2"] >= 1
    assert topology.starting.requests() == 0


def test_request_ids_are_kept_or_made(topology: Topology) -> None:
    topology.standin_ready(False)  # the real replica alone until the kill test
    with httpx.Client(base_url=topology.haproxy.url, timeout=60) as client:
        logged = len(topology.haproxy.log_lines())
        # The client's own id reaches the replica (which echoes it), and one is made when there is none.
        given = client.get("/healthz", headers={"X-Request-ID": "client-chosen-id"})
        made = client.get("/healthz")
    assert given.status_code == made.status_code == 200
    assert given.headers["x-request-id"] == "client-chosen-id"
    assert made.headers["x-request-id"] not in ("", "client-chosen-id")
    # HAProxy's log line carries the same ids as the replica's answer.
    logs = "\n".join(topology.haproxy.log_lines()[logged:])
    for response in (given, made):
        assert f"request_id={response.headers['x-request-id']} " in logs, logs


def _jobs(replica: LiveServer) -> int:
    """Jobs the replica's workers have finished (from /readyz)."""
    body = httpx.get(f"{replica.url}/readyz", timeout=10.0).json()
    return sum(int(worker["jobs"]) for worker in body["pool"]["workers"])


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
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 8))
    request = {**TRAIN, "x": x.tolist(), "y": (x @ rng.normal(size=(8, 1))).tolist()}
    chunks, every = 6, 200
    lines: list[dict[str, Any]] = []
    jobs_at_first_line = None
    topology.standin_ready(False)
    with httpx.Client(base_url=topology.haproxy.url, timeout=120) as client:
        before = _jobs(topology.real)
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
                    # Each chunk is one pool job. Had HAProxy buffered the stream, this first line
                    # would only arrive once every chunk had run; relayed as it comes, most are to come.
                    jobs_at_first_line = _jobs(topology.real) - before
    assert [line["type"] for line in lines] == ["progress"] * chunks + ["result"]
    assert [line["step"] for line in lines[:-1]] == [every * (i + 1) for i in range(chunks)]
    assert jobs_at_first_line is not None and jobs_at_first_line < chunks, jobs_at_first_line


def test_the_replicas_413_passes_through(topology: Topology) -> None:
    big = json.dumps({"expression": "x", "variables": {"x": [0.0] * (MAX_BODY_BYTES // 4)}})
    assert len(big) > MAX_BODY_BYTES
    headers = {"Content-Type": "application/json"}
    topology.standin_ready(False)
    with httpx.Client(base_url=topology.haproxy.url, timeout=60) as client:
        response = client.post("/v1/gradient", content=big, headers=headers)
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["code"] == "payload_too_large" and problem["allowed"] == MAX_BODY_BYTES
        # Under /umbridge, the protocol's own envelope (the replica's, relayed).
        response = client.post("/umbridge/Evaluate", content=big, headers=headers)
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "InvalidInput"
        # A body just under the limit goes through to the replica (it is bigger than HAProxy's buffer).
        x = np.linspace(-1.0, 1.0, 1000)
        assert _check(_gradient(client, x), x) == "r1"


def test_killing_a_replica_moves_the_traffic_without_a_failure(topology: Topology) -> None:
    topology.standin_ready(True)
    rng = np.random.default_rng(4)
    inputs = [rng.normal(size=4) for _ in range(60)]
    answered: list[str | BaseException] = []
    some_done = threading.Event()

    def send_all() -> None:
        with httpx.Client(base_url=topology.haproxy.url, timeout=60.0) as client:
            for i, x in enumerate(inputs):
                try:
                    answered.append(_check(_gradient(client, x), x))
                except (httpx.HTTPError, AssertionError) as error:  # recorded, and asserted on below
                    answered.append(error)
                if i == 9:
                    some_done.set()

    sender = threading.Thread(target=send_all)
    sender.start()
    try:
        assert some_done.wait(timeout=120.0), "the first requests did not complete"
        topology.ready.stop()  # SIGKILL: its connections are refused from now on
        # HAProxy takes it out by its checks (a refused connection is retried on another replica
        # meanwhile, so no request fails).
        topology.wait_states(r1="UP", r2="DOWN", r3="DOWN")
        logged = len(topology.haproxy.log_lines())
    finally:
        sender.join(timeout=300)
    assert not sender.is_alive()
    assert all(isinstance(a, str) for a in answered), answered
    assert len(answered) == len(inputs) and answered[:10].count("r2") >= 1, answered
    # After the kill, requests the killed replica no longer answers go to the real one.
    assert set(answered[10:]) <= {"r1", "r2"}
    assert answered[-1] == "r1"
    assert _send(topology, 5, seed=5) == {"r1": 5}
    assert set(topology.served(logged, "/v1/gradient")) == {"r1"}

    # No replica ready: the balancer answers at once, retryable, in each protocol's format.
    stop_server(topology.real)
    topology.wait_states(r1="DOWN", r2="DOWN", r3="DOWN")
    response = httpx.post(f"{topology.haproxy.url}/v1/gradient", json={"expression": "1"}, timeout=60.0)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "overloaded"
    response = httpx.post(f"{topology.haproxy.url}/umbridge/Evaluate", json={}, timeout=60.0)
    assert response.status_code == 503 and response.json()["error"]["type"] == "Overloaded"
    assert topology.starting.requests() == 0


def test_the_balancers_own_503_is_a_valid_http_response() -> None:
    """errors/overloaded.http is sent byte for byte: its status line, headers and length must be right."""
    raw = (HAPROXY_CONFIG.parent / "errors" / "overloaded.http").read_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    assert status == "HTTP/1.1 503 Service Unavailable"
    assert int(headers["content-length"]) == len(body)
    assert headers["content-type"] == "application/problem+json" and headers["retry-after"] == "1"
    problem = json.loads(body)
    assert problem["status"] == 503 and problem["code"] == "overloaded"
    # The codes HAProxy itself would answer are all this one.
    for code in (502, 503, 504):
        assert f"errorfile {code} errors/overloaded.http" in HAPROXY_CONFIG.read_text()
