"""The shared rate limit's step (GCRA in one statement) on both backends: bursts, the
steady rate, the wait, a new row for a new rate, and concurrent sessions that never let
more through than the limit."""

import threading
import time

import pytest

from keyswap.state import rate_limits
from keyswap.state.backends import Backend
from keyswap.state.rate_limits import Rate

T0 = 1_800_000_000.0  # a Unix time in 2027: doubles there are as coarse as today's


def take(backend: Backend, key: str, rate: Rate, now: float | None = None) -> float:
    with backend.session() as session:
        return rate_limits.take(session, key, rate, now)


def test_a_burst_of_count_passes_at_once_then_the_wait_is_one_interval(backend: Backend) -> None:
    rate = Rate.parse("10/s")
    assert [take(backend, "p|10/1s", rate, T0) for _ in range(10)] == [0.0] * 10
    assert take(backend, "p|10/1s", rate, T0) == pytest.approx(0.1, abs=1e-3)
    assert take(backend, "p|10/1s", rate, T0 + 0.05) == pytest.approx(0.05, abs=1e-3)


def test_the_steady_rate_is_count_per_period(backend: Backend) -> None:
    rate = Rate.parse("60/min")  # one a second, bursts of 60
    for _ in range(60):
        assert take(backend, "k", rate, T0) == 0.0
    for second in range(1, 6):
        now = T0 + second
        assert take(backend, "k", rate, now) == 0.0
        assert take(backend, "k", rate, now) == pytest.approx(1.0, abs=1e-3)
    # idle long enough and the whole burst is back, never more
    later = T0 + 1000
    assert [take(backend, "k", rate, later) for _ in range(61)].count(0.0) == 60


def test_the_wait_is_when_the_next_request_passes(backend: Backend) -> None:
    rate = Rate.parse("2/h")  # a place every 30 minutes
    assert take(backend, "k", rate, T0) == take(backend, "k", rate, T0 + 1) == 0.0
    wait = take(backend, "k", rate, T0 + 2)
    assert wait == pytest.approx(1800 - 2, abs=1e-2)
    assert take(backend, "k", rate, T0 + 2 + wait - 1) > 0  # a second early: refused
    assert take(backend, "k", rate, T0 + 2 + wait) == 0.0


def test_a_refusal_leaves_the_row_as_it_was(backend: Backend) -> None:
    rate = Rate.parse("1/s")
    assert take(backend, "k", rate, T0) == 0.0
    for _ in range(20):  # hammering does not push the next place further away
        assert take(backend, "k", rate, T0 + 0.5) == pytest.approx(0.5, abs=1e-3)
    assert take(backend, "k", rate, T0 + 1) == 0.0


def test_an_edited_rate_is_a_new_row_that_starts_afresh(backend: Backend) -> None:
    old, new = Rate.parse("2/s"), Rate.parse("5/s")
    assert old.key("crm") == "crm|2/1s" and new.key("crm") == "crm|5/1s"
    assert Rate.parse("120/min").key("crm") == "crm|120/60s" != Rate.parse("2/s").key("crm")
    assert [take(backend, old.key("crm"), old, T0) for _ in range(3)].count(0.0) == 2
    assert [take(backend, new.key("crm"), new, T0) for _ in range(6)].count(0.0) == 5
    assert take(backend, new.key("other"), new, T0) == 0.0  # each proxy its own row


def test_the_database_clock(backend: Backend) -> None:
    """Without `now`, the database's clock: a burst passes, the next one waits about an
    interval (less the time the burst took)."""
    rate = Rate.parse("5/min")
    started = time.monotonic()
    assert [take(backend, "k", rate) for _ in range(5)] == [0.0] * 5
    wait = take(backend, "k", rate)
    assert 12 - (time.monotonic() - started) - 0.01 <= wait <= 12.01
    with backend.session() as session:
        [row] = session.query("select tat, updated_at from rate_limits where key = 'k'")
    assert abs(row["tat"] - (time.time() + 60)) < 2 and row["updated_at"].endswith("Z")


def test_zero_lets_nothing_through(backend: Backend) -> None:
    assert take(backend, "k", Rate.parse("0/min"), T0) == 60.0


def hammer(backend: Backend, key: str, rate: Rate, threads: int, seconds: float) -> int:
    """Requests from `threads` threads, each on a session of its own, for `seconds`:
    how many passed."""
    passed = [0] * threads
    start = threading.Barrier(threads)

    def run(i: int) -> None:
        start.wait()
        deadline = time.monotonic() + seconds
        with backend.session() as session:
            while time.monotonic() < deadline:
                passed[i] += rate_limits.take(session, key, rate) == 0.0

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(passed)


def test_concurrent_sessions_never_pass_more_than_the_burst(backend: Backend) -> None:
    # a place every 12 s: in under a second, exactly the burst of 5 passes, however
    # many sessions race for the last place
    assert hammer(backend, "k", Rate.parse("5/min"), threads=4, seconds=0.8) == 5


def test_concurrent_sessions_keep_the_steady_rate(backend: Backend) -> None:
    rate = Rate.parse("20/s")
    started = time.monotonic()
    passed = hammer(backend, "k", rate, threads=4, seconds=1.5)
    elapsed = time.monotonic() - started
    # the burst, then one every 50 ms: never more; and not much less (no lost updates)
    assert passed <= 20 + 20 * elapsed
    assert passed >= 20 + 20 * 1.5 - 3


def test_prune_drops_only_idle_rows(backend: Backend) -> None:
    rate = Rate.parse("1/s")
    now = time.time()
    assert take(backend, "old", rate, now - 7200) == 0.0
    assert take(backend, "recent", rate, now - 10) == 0.0
    with backend.session() as session:
        assert rate_limits.prune(session, 3600) == 1
        assert [r["key"] for r in session.query("select key from rate_limits")] == ["recent"]
