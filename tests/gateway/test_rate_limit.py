import pytest

from keyswap.gateway.rate_limit import RateLimiter


def test_token_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("keyswap.gateway.rate_limit.time.monotonic", lambda: now[0])
    limiter = RateLimiter(2, 1)
    assert limiter.take() == 0 and limiter.take() == 0
    assert limiter.take() == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.take() == 0
    now[0] += 10
    assert limiter.take() == 0 and limiter.take() == 0 and limiter.take() > 0
