"""Rate limits: a token bucket per API key (or client address), kept in this process or in Redis.

``LocalLimiter`` keeps the buckets in this process, so each replica has its own: with N replicas a
client gets N times the configured rate. ``RedisLimiter`` keeps them in one Redis that every replica
uses, and refills and takes a token in one Lua script, so concurrent requests on different replicas
never both spend the same token and the limit holds for the sum. When Redis does not answer, the
replica decides with its own buckets (the per-process limit) until Redis answers again: a store
outage neither stops the service nor lifts the limit, it only loosens it to the per-replica one.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

__all__ = ["LocalLimiter", "RateLimiter", "RedisLimiter", "TokenBuckets", "make_limiter"]

logger = logging.getLogger("tapeserve.ratelimit")

# Buckets remembered at once; an idle full bucket is dropped first (it carries no state worth keeping).
# Bounded so a flood of distinct keys cannot grow memory (only valid keys get buckets anyway).
_MAX_BUCKETS = 10_000
# Redis answers a loopback or LAN round trip in well under a millisecond; a store that takes longer
# than this is treated as down rather than letting every request wait on it.
_REDIS_TIMEOUT_S = 0.25
# After a failure, requests are decided locally for this long before Redis is tried again, so an
# outage costs one timeout per second, not one per request.
_REDIS_RETRY_AFTER_S = 1.0
# Every bucket's Redis key starts with this, so the limiter can share a Redis with other data.
_KEY_PREFIX = "tapeserve:ratelimit:"
# An idle bucket expires once it would be full again (it then carries no state), but never later than
# this: a rate so low that refilling takes over a year is treated as refilled after a year.
_MAX_EXPIRY_MS = 365 * 24 * 3600 * 1000

# KEYS[1]: the bucket (a hash of tokens and the time they were counted); ARGV: rate (tokens a second)
# and burst (capacity). Returns the seconds until a token is available, as a string ("0" when one was
# taken; Redis would truncate a Lua number to an integer). The clock is Redis's own TIME, so replicas
# whose clocks disagree still share one refill schedule.
_TAKE_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'time')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then
  tokens = burst
  last = now
end
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'time', string.format('%.17g', now))
local expiry = math.ceil((burst - tokens) / rate * 1000) + 1000
redis.call('PEXPIRE', KEYS[1], math.min(expiry, tonumber(ARGV[3])))
return string.format('%.17g', wait)
"""


class RateLimiter(Protocol):
    """Takes one token from a key's bucket: 0.0 if the request may pass, else seconds until it may."""

    rate: float
    burst: float

    async def take(self, key: bytes) -> float: ...

    async def aclose(self) -> None: ...


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens a second up to ``burst``; a request takes one."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        # key -> (tokens, last refill time); LRU order so the least recently used goes first.
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()

    def take(self, key: bytes, now: float | None = None) -> float:
        """Take a token: 0.0 if allowed, else the seconds until a token is available."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        if len(self._buckets) > _MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return wait


class LocalLimiter:
    """Buckets in this process only: the limit is per replica."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets = TokenBuckets(rate, burst)

    async def take(self, key: bytes) -> float:
        return self._buckets.take(key)

    async def aclose(self) -> None:
        return None


class RedisLimiter:
    """Buckets in Redis, shared by every replica using the same ``url``; this process's own buckets
    decide while Redis does not answer (``on_store_error`` is called for each such decision)."""

    def __init__(
        self, url: str, rate: float, burst: int, *, on_store_error: Callable[[], None] | None = None
    ) -> None:
        # Imported here: only a server configured with a Redis store needs the client library.
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.rate = rate
        self.burst = float(burst)
        self.url = url
        self._client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=_REDIS_TIMEOUT_S,
            socket_connect_timeout=_REDIS_TIMEOUT_S,
            # No retries: a failed call falls back at once, and the next try is a second away anyway.
            retry=Retry(NoBackoff(), 0),
        )
        self._script = self._client.register_script(_TAKE_SCRIPT)
        self._fallback = TokenBuckets(rate, burst)
        self._on_store_error = on_store_error
        self._down_until = 0.0
        self._down = False

    async def take(self, key: bytes) -> float:
        import redis.exceptions

        if self._down and time.monotonic() < self._down_until:
            return self._local(key)
        try:
            answer = await self._script(
                keys=[_KEY_PREFIX + key.hex()], args=[self.rate, self.burst, _MAX_EXPIRY_MS]
            )
        except (redis.exceptions.RedisError, OSError) as error:
            self._down_until = time.monotonic() + _REDIS_RETRY_AFTER_S
            if not self._down:
                self._down = True
                # Once per outage: the metric counts every request decided locally meanwhile.
                logger.warning(
                    "rate-limit store %s did not answer (%s); this process's own buckets decide until it "
                    "does (the limit holds per replica meanwhile)",
                    _redacted(self.url),
                    type(error).__name__,
                )
            return self._local(key)
        if self._down:
            self._down = False
            logger.warning("rate-limit store %s answers again; limits are shared again", _redacted(self.url))
        return float(answer)

    def _local(self, key: bytes) -> float:
        if self._on_store_error is not None:
            self._on_store_error()
        return self._fallback.take(key)

    async def aclose(self) -> None:
        await self._client.aclose()


def make_limiter(
    store: str | None, rate: float | None, burst: int, *, on_store_error: Callable[[], None] | None = None
) -> RateLimiter | None:
    """The limiter the settings ask for: None without a rate, else local or Redis-backed buckets."""
    if rate is None:
        return None
    if store is None or store == "memory":
        return LocalLimiter(rate, burst)
    return RedisLimiter(store, rate, burst, on_store_error=on_store_error)


def _redacted(url: str) -> str:
    """The URL without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if user else '***'}@{host}"
