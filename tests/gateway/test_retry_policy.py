"""The retry policy alone: which answers are retried, the full-jitter bounds, Retry-After
(seconds, HTTP date, clamped) and when a request fails or expires instead."""

import random
from email.utils import formatdate

import pytest

from keyswap.gateway import retry_policy
from keyswap.gateway.retry_policy import Next, after_failure, backoff_s, retry_after_s, verdict


@pytest.mark.parametrize(
    ("status", "gateway_made", "code", "expected"),
    [
        (None, False, None, "retry"),  # no answer at all: connection error
        (500, False, "proxy-access-granted", "retry"),
        (503, False, "proxy-access-granted", "retry"),
        (408, False, "proxy-access-granted", "retry"),
        (429, False, "proxy-access-granted", "retry"),
        (200, False, "proxy-access-granted", "done"),
        (201, False, "proxy-access-granted", "done"),
        (404, False, "proxy-access-granted", "done"),  # delivered: the answer is the client's
        (422, False, "proxy-access-granted", "done"),
        (502, True, "proxy-error", "retry"),  # the gateway could not reach the target
        (504, True, "proxy-error", "retry"),
        (503, True, "proxy-access-denied", "retry"),  # shutting down, state unavailable
        (403, True, "proxy-access-denied", "refused"),  # the proxy was disabled meanwhile
        (404, True, "proxy-access-denied", "refused"),
    ],
)
def test_verdict(status: int | None, gateway_made: bool, code: str | None, expected: str) -> None:
    assert verdict(status, gateway_made, code) == expected


def test_backoff_is_full_jitter_under_a_doubling_capped_bound() -> None:
    rng = random.Random(7)
    for attempt, bound in [(1, 1.0), (2, 2.0), (3, 4.0), (9, 256.0), (10, 300.0), (60, 300.0)]:
        waits = [backoff_s(attempt, rng) for _ in range(300)]
        assert all(0 <= w <= bound for w in waits)
        assert max(waits) > bound * 0.9 and min(waits) < bound * 0.1  # spread, not fixed


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("2", 2.0),
        (" 0 ", 0.0),
        ("99999", retry_policy.RETRY_AFTER_MAX_S),
        ("soon", None),
        ("-5", None),
    ],
)
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert retry_after_s(value, 1000.0) == expected


def test_retry_after_as_an_http_date() -> None:
    now = 1_800_000_000.0
    assert retry_after_s(formatdate(now + 30, usegmt=True), now) == pytest.approx(30, abs=1)
    assert retry_after_s(formatdate(now - 30, usegmt=True), now) == 0.0  # already past


def test_after_failure_queues_fails_or_expires() -> None:
    rng = random.Random(1)
    again = after_failure(1, 8, deadline=2000.0, now=1000.0, retry_after=None, rng=rng)
    assert again.state == "queued" and again.at is not None and 1000.0 <= again.at <= 1001.0
    assert after_failure(8, 8, 2000.0, 1000.0, None) == Next("failed", None)
    assert after_failure(2, 8, 1001.0, 1000.0, 5.0) == Next("expired", None)
    waited = after_failure(1, 8, 2000.0, 1000.0, 30.0, rng)
    assert waited == Next("queued", 1030.0)  # Retry-After longer than the backoff wins
