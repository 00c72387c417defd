"""When to retry a call and how long to wait: exponential backoff with full jitter, or Retry-After.

Every tapeserve endpoint is a pure function of its body, so repeating a request is always safe;
only answers that say "not now" (overloaded, worker crashed, rate limited) and connection failures
are retried. A computation that passed its deadline (504) is not: it would time out again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from service.client._exceptions import (
    APIError,
    ConnectError,
    Overloaded,
    RateLimited,
    TapeserveError,
    WorkerCrashed,
)

__all__ = ["Attempts", "Retry"]


@dataclass(frozen=True)
class Retry:
    """Retry policy: ``attempts`` retries at most, waiting ``backoff * 2**n`` (capped, jittered).

    A Retry-After the server sends is honoured (up to ``max_retry_after`` seconds; a longer wait
    raises at once rather than blocking the caller for minutes).
    """

    attempts: int = 3
    # A request whose worker died is sent again at most this many times: if the request itself is what
    # kills workers (a poison program), every further retry would take down one more.
    crash_retries: int = 1
    backoff: float = 0.25  # seconds before the first retry (before jitter)
    max_backoff: float = 8.0  # cap of one exponential wait
    max_retry_after: float = 60.0
    # Draws the jitter; tests pass a seeded random.Random for reproducible waits.
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        values = (self.attempts, self.crash_retries, self.backoff, self.max_backoff, self.max_retry_after)
        if min(values) < 0:
            raise ValueError("Retry values must be non-negative")

    @staticmethod
    def retryable(error: TapeserveError) -> bool:
        return isinstance(error, ConnectError | Overloaded | WorkerCrashed | RateLimited)

    def delay(self, retry: int, error: TapeserveError, crashes: int = 0) -> float | None:
        """Seconds to wait before retry number ``retry`` (0-based), or None when not to retry.

        ``crashes``: how many earlier answers to this call were ``worker_crashed``.
        """
        if retry >= self.attempts or not self.retryable(error):
            return None
        if isinstance(error, WorkerCrashed) and crashes >= self.crash_retries:
            return None
        retry_after = getattr(error, "retry_after", None) if isinstance(error, APIError) else None
        if retry_after is not None:
            if retry_after > self.max_retry_after:
                return None
            # The server's wait plus a little spread, so clients told the same time do not return together.
            return float(retry_after) + self.rng.uniform(0.0, self.backoff)
        # "Full jitter": uniform in [0, cap], the spread that clears a thundering herd fastest.
        return self.rng.uniform(0.0, min(self.max_backoff, self.backoff * 2.0**retry))


class Attempts:
    """One call's retries so far, under a ``Retry`` policy: the wait before the next one."""

    def __init__(self, policy: Retry) -> None:
        self.policy = policy
        self.retries = 0
        self.crashes = 0  # earlier answers to this call that were worker_crashed

    def wait_after(self, error: TapeserveError) -> float:
        """Seconds to wait before sending again after ``error``; raises ``error`` when not to retry."""
        delay = self.policy.delay(self.retries, error, self.crashes)
        if delay is None:
            raise error
        self.crashes += isinstance(error, WorkerCrashed)
        self.retries += 1
        return delay
