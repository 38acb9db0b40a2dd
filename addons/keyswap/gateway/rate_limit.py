"""Rate limiting: one token bucket per proxy with a `rate_limit`."""

from __future__ import annotations

import math
import time


class RateLimiter:
    """A token bucket: `count` requests per `per_s` seconds, bursts up to `count`."""

    def __init__(self, count: int, per_s: int) -> None:
        self.capacity = float(count)
        self.rate = count / per_s
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def take(self) -> float:
        """0 when the request may pass, else the seconds until it could."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate if self.rate else math.inf
