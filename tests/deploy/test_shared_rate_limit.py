"""Rate limits across replicas: two `tapeserve serve` replicas (one worker each) sharing Debian's
redis-server, one client alternating between them, all on loopback.

The limit holds for the sum (burst B: exactly B requests pass over both replicas), and X-Forwarded-For
names the client only when the peer is the trusted balancer address (127.0.0.1 here; a client
connecting from 127.0.0.2 is not trusted, so its header is ignored). Then the same through Debian's
nginx running the repo's config: each client behind it has its own bucket, shared by both replicas.
Last, through Debian's haproxy running deploy/haproxy/haproxy.cfg, the balancer docker-compose.yml
runs: one client gets the burst in total over both replicas, whatever X-Forwarded-For it sends.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, start_server, stop_server
from tests.deploy.support import haproxy_binary, nginx_binary, start_haproxy, start_nginx, wait_for
from tests.redisserver import RedisServer, start_redis

BURST = 4
# So low that no token comes back during the test: which requests pass does not depend on timing.
RATE = 0.001
TRUSTED = "127.0.0.1"  # the balancer's address, as the replicas are told
UNTRUSTED = "127.0.0.2"  # any other peer (Linux routes all of 127/8 to loopback)
CLIENT_BEHIND_HAPROXY = "127.0.0.5"  # a bucket no other test uses


@dataclass
class Replicas:
    servers: list[LiveServer]
    redis: RedisServer


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    tmp = tmp_path_factory.mktemp("shared-limit")
    redis = start_redis(tmp)
    env = {
        "TAPESERVE_RATE_LIMIT": str(RATE),
        "TAPESERVE_RATE_LIMIT_BURST": str(BURST),
        "TAPESERVE_RATE_LIMIT_STORE": redis.url,
        "TAPESERVE_FORWARDED_ALLOW_IPS": TRUSTED,
        "TAPESERVE_LOG_FORMAT": "text",
    }
    servers: list[LiveServer] = []
    try:
        for _ in range(2):
            servers.append(start_server(tmp, env))
        yield Replicas(servers, redis)
    finally:
        for server in servers:
            stop_server(server)
        redis.stop()


def _client(source: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=60.0)


def _alternate(
    replicas: Replicas, source: str, forwarded_for: str | None, count: int
) -> list[httpx.Response]:
    """``count`` requests from ``source`` to replica 0, 1, 0, ... (GET /v1/functions: limited, no worker)."""
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    with _client(source) as client:
        return [
            client.get(f"{replicas.servers[i % 2].url}/v1/functions", headers=headers) for i in range(count)
        ]


def _check_refusal(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "rate_limited"
    # One token at 0.001/s is ~1000 s away; the header and the body agree.
    assert 900 <= int(response.headers["retry-after"]) <= 1000
    assert problem["retry_after"] == int(response.headers["retry-after"])


def test_the_limit_holds_for_the_sum_of_both_replicas(replicas: Replicas) -> None:
    responses = _alternate(replicas, TRUSTED, "198.51.100.1", 3 * BURST)
    assert [r.status_code for r in responses] == [200] * BURST + [429] * (2 * BURST)
    for response in responses[BURST:]:
        _check_refusal(response)
    # Both replicas refused: neither has a private bucket that would let more through.
    assert {str(r.url).split("/v1")[0] for r in responses[BURST:]} == {s.url for s in replicas.servers}


def test_forwarded_for_names_the_client_only_from_the_trusted_address(replicas: Replicas) -> None:
    # From the trusted balancer: each forwarded client has its own bucket, and so has the balancer itself.
    assert _alternate(replicas, TRUSTED, "198.51.100.2", 1)[0].status_code == 200
    assert _alternate(replicas, TRUSTED, None, 1)[0].status_code == 200

    # From an untrusted peer the header is ignored: the bucket is the peer's address, whatever it says.
    spoofed = [f"198.51.100.{n}" for n in range(10, 10 + 2 * BURST)]
    statuses = []
    with _client(UNTRUSTED) as client:
        for i, claimed in enumerate(spoofed):
            url = f"{replicas.servers[i % 2].url}/v1/functions"
            statuses.append(client.get(url, headers={"X-Forwarded-For": claimed}).status_code)
    assert statuses == [200] * BURST + [429] * BURST, statuses
    # Those addresses' buckets were never touched: through the trusted address each still has its burst.
    assert _alternate(replicas, TRUSTED, spoofed[-1], 1)[0].status_code == 200


def test_behind_nginx_each_client_has_one_bucket_over_both_replicas(
    replicas: Replicas, tmp_path: Path
) -> None:
    nginx_binary()  # skips when nginx is missing
    # nginx's workers run as an unprivileged user: they must be able to reach the prefix.
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    for path in (prefix, *prefix.parents):
        if path in (Path("/tmp"), Path("/")):
            break
        path.chmod(path.stat().st_mode | 0o011)
    nginx = start_nginx(
        prefix, [s.url.removeprefix("http://") for s in replicas.servers], max_body_bytes=1 << 20
    )
    try:
        statuses = {}
        # Clients on fresh addresses; nginx (127.0.0.1, trusted) appends each one's address to the
        # X-Forwarded-For it was sent, so a made-up entry to its left changes nothing.
        for client_address in ("127.0.0.3", "127.0.0.4"):
            with _client(client_address) as client:
                statuses[client_address] = [
                    client.get(
                        f"{nginx.url}/v1/functions", headers={"X-Forwarded-For": f"198.51.100.{100 + i}"}
                    ).status_code
                    for i in range(2 * BURST)
                ]
        lines = [line for line in nginx.access_lines() if "/v1/functions" in line]
    finally:
        nginx.stop()
    for address, seen in statuses.items():
        assert seen == [200] * BURST + [429] * BURST, (address, seen)
    # nginx spread the requests over both replicas, so the buckets were shared, not per replica.
    upstreams: Counter[str] = Counter()
    for line in lines:
        match = re.search(r'upstream="([^"]*)"', line)
        assert match, line
        upstreams[match[1]] += 1
    assert set(upstreams) == {s.url.removeprefix("http://") for s in replicas.servers}, upstreams


# A request's line in HAProxy's log (haproxy.cfg's log-format):
#   ... public replicas/r1 ... "GET /v1/functions HTTP/1.1"
_HAPROXY_LOG = re.compile(r" public replicas/(\S+) .*\"GET /v1/functions HTTP/[\d.]+\"$")


def test_behind_haproxy_one_client_has_one_bucket_over_both_replicas(
    replicas: Replicas, tmp_path: Path
) -> None:
    haproxy_binary()  # skips when haproxy is missing
    for server in replicas.servers:
        server.wait_ready()  # HAProxy sends requests only to replicas whose /readyz answers 200
    haproxy = start_haproxy(
        tmp_path / "haproxy",
        {f"r{i}": server.url.removeprefix("http://") for i, server in enumerate(replicas.servers, 1)},
    )
    try:
        wait_for(
            lambda: {s.split()[0] for s in haproxy.server_states().values()} == {"UP"},
            "haproxy sees both replicas up",
        )
        # A client on a fresh address, which HAProxy (127.0.0.1, trusted) passes on as the client: its
        # burst in total over both replicas, though every request claims another X-Forwarded-For.
        with _client(CLIENT_BEHIND_HAPROXY) as client:
            responses = [
                client.get(
                    f"{haproxy.url}/v1/functions", headers={"X-Forwarded-For": f"198.51.100.{200 + i}"}
                )
                for i in range(3 * BURST)
            ]
        assert [r.status_code for r in responses] == [200] * BURST + [429] * (2 * BURST)
        for response in responses[BURST:]:
            _check_refusal(response)

        def logged() -> list[str]:
            return [m[1] for m in map(_HAPROXY_LOG.search, haproxy.log_lines()) if m]

        wait_for(lambda: len(logged()) == len(responses), "haproxy logs every request")
        # Both replicas answered this client: a replica with buckets of its own would have let more pass.
        assert set(logged()) == {"r1", "r2"}, logged()

        # A client whose own address the replicas trust (here the balancer's, 127.0.0.1; in compose any
        # client if they trusted "*" or a network holding clients): had HAProxy kept the client's
        # X-Forwarded-For and only appended its own entry, uvicorn would skip the trusted right-most
        # entry and take the client's made-up one, a fresh bucket each time. HAProxy drops it, so all
        # these requests share one bucket (which earlier tests may have used: at most the burst passes).
        with _client(TRUSTED) as client:
            statuses = [
                client.get(
                    f"{haproxy.url}/v1/functions", headers={"X-Forwarded-For": f"203.0.113.{i}"}
                ).status_code
                for i in range(2 * BURST + 1)
            ]
    finally:
        haproxy.stop()
    passed = statuses.count(200)
    assert passed <= BURST and statuses == [200] * passed + [429] * (len(statuses) - passed), statuses
