"""When an async request is tried again: which answers are worth another attempt, how
long to wait (exponential backoff with full jitter, or the target's `Retry-After`), and
when to give up. Pure: the deliverer supplies the attempt's result and the clock."""

from __future__ import annotations

import random
import re
from email.utils import parsedate_to_datetime
from typing import Literal, NamedTuple

from keyswap.gateway import problem

# The first retry waits up to BASE_S, each next one up to twice as long, never more than
# CAP_S (AWS's "full jitter": uniform in [0, bound], which spreads retries of many
# requests that failed together instead of bunching them).
BASE_S = 1.0
CAP_S = 300.0
# A target's Retry-After is honoured up to this long; a larger one is clamped (a typo
# or a hostile answer must not park a request for days).
RETRY_AFTER_MAX_S = 3600.0

# Target answers that mean "not now": another attempt may well succeed.
RETRYABLE_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))

Verdict = Literal["retry", "done", "refused"]
_SECONDS = re.compile(r"[0-9]{1,10}")  # ASCII digits only: str.isdigit() takes "²"


def verdict(status: int | None, gateway_made: bool, code: str | None) -> Verdict:
    """`retry` for a connection failure, timeout, 5xx, 408 or 429; `done` for any other
    answer of the target (delivered: the client reads the answer); `refused` when the
    gateway itself refused the attempt (the proxy was disabled, its rules changed)."""
    if status is None:
        return "retry"
    if not gateway_made:
        return "retry" if status in RETRYABLE_STATUSES else "done"
    # The gateway's own answers: a failure to reach the target (502, 504), or a
    # passing state of this gateway (503 shutting down, 500) are worth another attempt;
    # a refusal (401, 403, 404, 405, ...) is final.
    return "retry" if code == problem.PROXY_ERROR or status >= 500 else "refused"


def backoff_s(attempt: int, rng: random.Random | None = None) -> float:
    """The wait after failed attempt number `attempt` (from 1)."""
    bound = min(CAP_S, BASE_S * 2 ** min(attempt - 1, 30))
    return (rng or random).uniform(0, bound)


def retry_after_s(value: str | None, now: float) -> float | None:
    """A `Retry-After` value (seconds or an HTTP date) as seconds from `now`, clamped
    to [0, RETRY_AFTER_MAX_S]; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        seconds = float(value)
    else:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return max(0.0, min(seconds, RETRY_AFTER_MAX_S))


class Next(NamedTuple):
    """What follows a failed attempt: another one at `at` (Unix time), or the end."""

    state: Literal["queued", "failed", "expired"]
    at: float | None


def after_failure(
    attempt: int,
    max_attempts: int,
    deadline: float,
    now: float,
    retry_after: float | None,
    rng: random.Random | None = None,
) -> Next:
    """Another attempt, unless this was the last allowed (`failed`) or the next would
    start after the deadline (`expired`). The wait is the backoff, or the target's
    Retry-After when it asks for longer."""
    if attempt >= max_attempts:
        return Next("failed", None)
    wait = backoff_s(attempt, rng)
    if retry_after is not None:
        wait = max(wait, retry_after)
    at = now + wait
    if at >= deadline:
        return Next("expired", None)
    return Next("queued", at)
