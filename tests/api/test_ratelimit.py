"""The rate-limit store: the Lua token bucket against a real redis-server, its fallback when Redis does
not answer, and two in-process apps sharing one Redis (the limit holds for the sum)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api import Settings, create_app
from service.api.ratelimit import LocalLimiter, RedisLimiter, make_limiter
from tests.api.fakes import FakePool
from tests.conftest import free_port
from tests.redisserver import RedisServer, start_redis

# So low that no token comes back during a test: outcomes do not depend on timing.
TINY_RATE = 0.001
GRAD = {"expression": "sum(x**2)", "variables": {"x": [1.0, 2.0]}}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store(redis_server: RedisServer) -> str:
    """The shared Redis, emptied: each test starts with no buckets."""

    async def flush() -> None:
        async with redis.asyncio.Redis.from_url(redis_server.url) as client:
            await client.flushdb()

    asyncio.run(flush())
    return redis_server.url


def test_a_bucket_spends_its_burst_then_names_the_wait(store: str) -> None:
    async def run() -> list[float]:
        limiter = RedisLimiter(store, rate=0.01, burst=3)
        try:
            return [await limiter.take(b"k") for _ in range(5)]
        finally:
            await limiter.aclose()

    waits = asyncio.run(run())
    assert waits[:3] == [0.0, 0.0, 0.0]
    # No token left: one comes back after 1 / 0.01 = 100 s (minus the little refilled meanwhile).
    assert all(99.0 < wait <= 100.0 for wait in waits[3:]), waits


def test_buckets_are_per_key_and_expire_once_full_again(store: str) -> None:
    async def run() -> tuple[list[float], list[bytes | str], int]:
        limiter = RedisLimiter(store, rate=0.5, burst=2)
        try:
            waits = [await limiter.take(b"a") for _ in range(3)] + [await limiter.take(b"b")]
            async with redis.asyncio.Redis.from_url(store) as client:
                keys = sorted(await client.keys("*"))
                ttl = await client.pttl("tapeserve:ratelimit:" + b"a".hex())
            return waits, keys, ttl
        finally:
            await limiter.aclose()

    waits, keys, ttl = asyncio.run(run())
    assert waits[:2] == [0.0, 0.0] and waits[2] > 0.0 and waits[3] == 0.0
    assert keys == [b"tapeserve:ratelimit:" + k.hex().encode() for k in (b"a", b"b")]
    # Empty bucket, 2 tokens at 0.5/s: full again after 4 s; the key lives that long plus a second.
    assert 0 < ttl <= 5000, ttl


def test_refill_follows_the_redis_clock_and_stops_at_the_burst(store: str) -> None:
    key = "tapeserve:ratelimit:" + b"k".hex()

    async def age_bucket(client: redis.asyncio.Redis, seconds: float) -> None:
        # Move the bucket's last count into the past instead of sleeping: the refill is then exact.
        seconds_now, micros = await client.time()
        await client.hset(key, "time", repr(seconds_now + micros / 1e6 - seconds))

    async def run() -> tuple[list[float], list[float]]:
        limiter = RedisLimiter(store, rate=0.1, burst=2)
        try:
            async with redis.asyncio.Redis.from_url(store) as client:
                assert [await limiter.take(b"k") for _ in range(3)][:2] == [0.0, 0.0]
                await age_bucket(client, 10.5)  # 1.05 tokens refilled
                after_refill = [await limiter.take(b"k") for _ in range(2)]
                await age_bucket(client, 1e6)  # far more than the burst
                after_long_idle = [await limiter.take(b"k") for _ in range(3)]
                return after_refill, after_long_idle
        finally:
            await limiter.aclose()

    after_refill, after_long_idle = asyncio.run(run())
    assert after_refill[0] == 0.0
    # 0.05 tokens left (plus what the few milliseconds since added): under (1 - 0.05) / 0.1 = 9.5 s.
    assert 5.0 < after_refill[1] <= 9.5 + 1e-9, after_refill
    assert after_long_idle[:2] == [0.0, 0.0] and after_long_idle[2] > 0.0, after_long_idle


def test_concurrent_takes_from_two_limiters_spend_each_token_once(store: str) -> None:
    # Two limiters with their own connections stand for two replicas; the script runs atomically, so
    # of 60 concurrent requests exactly the burst passes.
    async def run() -> list[float]:
        replicas = [RedisLimiter(store, rate=TINY_RATE, burst=10) for _ in range(2)]
        try:
            return list(await asyncio.gather(*(replicas[i % 2].take(b"shared") for i in range(60))))
        finally:
            for limiter in replicas:
                await limiter.aclose()

    waits = asyncio.run(run())
    assert waits.count(0.0) == 10, waits


def test_an_unreachable_store_falls_back_to_local_buckets_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens here yet
    fallbacks: list[int] = []

    async def run() -> tuple[list[float], list[float]]:
        limiter = RedisLimiter(
            f"redis://127.0.0.1:{port}/0", rate=TINY_RATE, burst=2, on_store_error=lambda: fallbacks.append(1)
        )
        try:
            local = [await limiter.take(b"k") for _ in range(3)]
            server = start_redis(tmp_path, port)
            try:
                # Redis is tried again a second after the failure; wait for it (a ceiling, not a delay).
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30.0
                shared: list[float] = []
                while loop.time() < deadline:
                    before = len(fallbacks)
                    wait = await limiter.take(b"k")
                    if len(fallbacks) == before:
                        shared.append(wait)  # answered by Redis: a fresh, shared bucket
                        break
                    await asyncio.sleep(0.1)
                shared += [await limiter.take(b"k") for _ in range(2)]
                return local, shared
            finally:
                server.stop()
        finally:
            await limiter.aclose()

    with caplog.at_level(logging.WARNING, logger="tapeserve.ratelimit"):
        local, shared = asyncio.run(run())
    # While down: this process's buckets still hold the limit, and every such decision is counted.
    assert local[:2] == [0.0, 0.0] and local[2] > 0.0
    assert len(fallbacks) >= 3
    # Back: Redis's bucket (new, so full) decides again.
    assert shared[:2] == [0.0, 0.0] and shared[2] > 0.0, shared
    messages = [record.getMessage() for record in caplog.records]
    assert sum("did not answer" in m for m in messages) == 1, messages  # once per outage, not per request
    assert sum("answers again" in m for m in messages) == 1, messages


def test_settings_choose_the_store() -> None:
    assert isinstance(make_limiter(None, 1.0, 5), LocalLimiter)
    assert isinstance(make_limiter("memory", 1.0, 5), LocalLimiter)
    assert make_limiter("redis://127.0.0.1:1/0", None, 5) is None  # no rate: no limiter
    assert Settings(rate_limit_store=" redis://cache:6379/2 ").rate_limit_store == "redis://cache:6379/2"
    assert Settings(rate_limit_store="").rate_limit_store is None
    for nonsense in ("cache:6379", "http://cache:6379", "mem"):
        with pytest.raises(ValidationError):
            Settings(rate_limit_store=nonsense)


def test_forwarded_allow_ips_are_addresses_or_networks() -> None:
    assert Settings().forwarded_allow_ips is None
    assert Settings(forwarded_allow_ips="").forwarded_allow_ips is None
    assert Settings(forwarded_allow_ips="10.0.0.2, 172.16.0.0/12,::1").forwarded_allow_ips == (
        "10.0.0.2,172.16.0.0/12,::1"
    )
    assert Settings(forwarded_allow_ips="*").forwarded_allow_ips == "*"
    for nonsense in ("balancer", "10.0.0.300", "10.0.0.1,,10.0.0.2"):
        with pytest.raises(ValidationError):
            Settings(forwarded_allow_ips=nonsense)


def _app(store: str, **settings: Any) -> TestClient:
    config = Settings(rate_limit_store=store, rate_limit=TINY_RATE, **settings)
    return TestClient(create_app(config, pool=FakePool()), raise_server_exceptions=False)


def test_two_apps_sharing_redis_hold_a_keys_limit_for_the_sum(store: str) -> None:
    keys = {"api_keys": "key-one,key-two", "rate_limit_burst": 3}
    with _app(store, **keys) as first, _app(store, **keys) as second:
        statuses = []
        for i in range(8):
            replica = (first, second)[i % 2]
            response = replica.post("/v1/gradient", json=GRAD, headers={"Authorization": "Bearer key-one"})
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert response.headers["content-type"] == "application/problem+json"
                assert int(response.headers["retry-after"]) >= 1
                assert response.json()["code"] == "rate_limited"
        assert statuses == [200, 200, 200] + [429] * 5, statuses
        # Another key has its own (shared) bucket.
        other = {"Authorization": "Bearer key-two"}
        assert second.post("/v1/gradient", json=GRAD, headers=other).status_code == 200
        metrics = first.get("/metrics", headers=other).text
        assert "tapeserve_rate_limit_store_errors_total 0.0" in metrics


def test_memory_store_is_per_process(store: str) -> None:
    # The contrast: without the shared store each app has its own bucket, so two apps pass twice the burst.
    with _app("memory", rate_limit_burst=2) as first, _app("memory", rate_limit_burst=2) as second:
        statuses = [(first, second)[i % 2].get("/v1/functions").status_code for i in range(6)]
    assert statuses == [200, 200, 200, 200, 429, 429], statuses
