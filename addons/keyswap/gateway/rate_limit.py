"""Rate limiting for the policy stage: each request to a proxy with a `rate_limit` takes
its place in the state database (keyswap.state.rate_limits), so that the limit holds for
every gateway process and node sharing the database together.

The step runs on a small pool of threads of its own, each with its own session (not the
default executor, which mitmproxy uses for DNS), and the event loop waits for it at most
BOUND_S. A step that fails or does not answer in time is `Unavailable`, and the request
is refused: a limit that cannot be checked never lets a request through."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from keyswap.state import rate_limits
from keyswap.state.backends import Backend, StateError, open_backend
from keyswap.state.rate_limits import Rate

logger = logging.getLogger(__name__)

THREADS = 2
BOUND_S = 2.0
PRUNE_EVERY_S = 3600.0
PRUNE_IDLE_S = 86400.0
LOG_EVERY_S = 10.0


def retry_after(wait: float) -> str:
    """A `Retry-After` value for a wait: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait)))


class Unavailable(Exception):
    """The state database did not answer the rate-limit step in time, or failed."""


class RateLimits:
    """Takes rate-limit steps in the state database at `db`, off the event loop."""

    def __init__(self, db: str, bound_s: float = BOUND_S, threads: int = THREADS) -> None:
        self.db = db
        self.bound_s = bound_s
        # Threads start on first use: a config without rate limits costs nothing.
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="keyswap-rate-limit")
        self._backend: Backend | None = None
        self._opening = threading.Lock()
        self._next_prune = time.monotonic()
        self._last_log = -LOG_EVERY_S

    async def take(self, key: str, rate: Rate) -> float:
        """0.0 when a request may pass the limit of row `key`, else the seconds until one
        could; Unavailable when the database cannot say within `bound_s`."""
        now = time.monotonic()
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY_S
            self._executor.submit(self._prune)
        step = self._executor.submit(self._step, key, rate, now + self.bound_s)
        try:
            # On time-out the step is cancelled if it has not started.
            return await asyncio.wait_for(asyncio.wrap_future(step), self.bound_s)
        except TimeoutError:
            raise self._unavailable(f"no answer within {self.bound_s:g} s") from None
        except (StateError, Unavailable) as e:
            raise self._unavailable(str(e)) from e

    def _unavailable(self, why: str) -> Unavailable:
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            logger.error(
                "keyswap: rate limits cannot be checked, rate-limited requests get 503: %s",
                why,
            )
        return Unavailable(why)

    def _opened(self) -> Backend:
        with self._opening:
            if self._backend is None:
                self._backend = open_backend(self.db)
            return self._backend

    def _step(self, key: str, rate: Rate, deadline: float) -> float:
        # Queued behind a slow step past its request's time: that request is answered
        # already, and must not take a place.
        if time.monotonic() >= deadline:
            raise Unavailable(f"no answer within {self.bound_s:g} s")
        with self._opened().session() as session:
            return rate_limits.take(session, key, rate)

    def _prune(self) -> None:
        try:
            with self._opened().session() as session:
                rate_limits.prune(session, PRUNE_IDLE_S)
        except StateError as e:
            logger.warning("keyswap: pruning idle rate-limit rows failed: %s", e)

    def close(self) -> None:
        """Finish the steps under way, then close the connections."""
        self._executor.shutdown(cancel_futures=True)
        if self._backend is not None:
            self._backend.close()
