"""The refusal brake: a client whose requests keep being refused gets its further refusals later.

Refusing a bad request is cheap, but not free: a client that loops over requests the service
refuses (deadlines under the floor, a quarantined program, a malformed body) at hundreds a second
takes the API's event loop and a core from everyone else. Each client has a bucket of refusals,
``rate`` a second up to ``burst``; a 4xx answer takes one, and when the bucket is empty the answer
waits (``asyncio.sleep``: no CPU) until the client's turn comes, at most ``MAX_DELAY_S``. A looping
client is thereby paced to about ``rate`` refusals a second; concurrent refusals queue behind each
other. Successful answers are never delayed and never counted, so an ordinary client, which makes
the odd mistake, never meets the brake.

A client is its address: the peer's, or X-Forwarded-For's from a trusted balancer
(TAPESERVE_FORWARDED_ALLOW_IPS). Behind a balancer that is not trusted, all clients share one
bucket, so the brake delays refusals of everybody while somebody loops (never their successes).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["MAX_DELAY_S", "RefusalBrake", "RefusalBuckets"]

# A refusal waits at most this long: long enough to pace a loop to a handful of requests a second,
# short enough that a client that has stopped looping is answered promptly again.
MAX_DELAY_S = 1.0
# Clients remembered (least recently refused forgotten first): ~100 bytes each.
MAX_CLIENTS = 10_000


class RefusalBuckets:
    """Per-client refusal allowance; ``charge`` says how long this refusal waits (0.0: not at all)."""

    def __init__(self, rate: float, burst: int, max_delay_s: float = MAX_DELAY_S) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_delay_s = max_delay_s
        # client -> (tokens, time of last update); tokens go below zero as refusals queue.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def charge(self, client: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate) - 1.0
        # The queue is bounded by the longest wait: beyond it a refusal waits the maximum, no longer.
        tokens = max(tokens, -self.rate * self.max_delay_s)
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        return 0.0 if tokens >= 0.0 else min(self.max_delay_s, -tokens / self.rate)


class RefusalBrake:
    """ASGI middleware: holds a 4xx answer's start while its client is over its refusal allowance."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        rate: float,
        burst: int,
        on_delay: Callable[[float], None] | None = None,
    ) -> None:
        self.app = app
        self.buckets = RefusalBuckets(rate, burst)
        self.on_delay = on_delay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        peer = scope.get("client")
        client = peer[0] if peer else ""

        async def braked(message: Message) -> None:
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                delay = self.buckets.charge(client)
                if delay > 0.0:
                    if self.on_delay is not None:
                        self.on_delay(delay)
                    await asyncio.sleep(delay)
            await send(message)

        await self.app(scope, receive, braked)
