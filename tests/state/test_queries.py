import json
from pathlib import Path

import pytest
from sqlite_utils import Database

from keyswap.config.model import Config
from keyswap.state import queries
from keyswap.state.store import open_db


@pytest.fixture
def db(tmp_path: Path):
    database = open_db(tmp_path / "k.db")
    yield database
    database.close()


def add(db: Database, i: int, **fields: object) -> None:
    row = {
        "id": f"{i:026d}",
        "started_at": fields.pop("started_at", "2099-01-01T00:00:00.000Z"),
        "proxy_id": "a",
        "status": 200,
        "proxy_code": "proxy-access-granted",
        "duration_ms": float(i),
        "method": "GET",
    }
    db["requests"].insert({**row, **fields})


def test_percentiles_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert queries.percentile(values, 0.50) == 50
    assert queries.percentile(values, 0.95) == 95
    assert queries.percentile(values, 0.99) == 99
    assert queries.percentile([7.0], 0.99) == 7
    assert queries.percentile([], 0.5) is None


def test_stats_from_rows_with_known_durations(db: Database) -> None:
    for i in range(1, 101):
        add(db, i, bytes_in=10, bytes_out=100)
    add(db, 101, status=401, proxy_code="proxy-access-denied", duration_ms=1000.0)
    add(db, 102, status=502, proxy_code="proxy-error", duration_ms=2000.0)
    add(db, 103, proxy_id="b", duration_ms=3.0)
    by_proxy = {s["proxy"]: s for s in queries.stats(db)}
    a = by_proxy["a"]
    assert a["requests"] == 102 and a["denied"] == 1
    assert a["success_rate"] == round(100 / 102, 4) and a["error_rate"] == round(1 / 102, 4)
    # latency covers forwarded requests only: 1..100 ms
    assert (a["p50_ms"], a["p95_ms"], a["p99_ms"]) == (50, 95, 99)
    assert (a["bytes_in"], a["bytes_out"]) == (1000, 10000)
    assert by_proxy["b"]["p99_ms"] == 3.0


def test_log_filters(db: Database) -> None:
    add(db, 1, status=200)
    add(db, 2, status=404, proxy_code="proxy-access-denied")
    add(db, 3, status=503, proxy_id="b")
    add(db, 4, status=429, proxy_code="proxy-access-denied", started_at="2000-01-01T00:00:00.000Z")
    ids = lambda rows: [int(r["id"]) for r in rows]  # noqa: E731
    assert ids(queries.logs(db)) == [1, 2, 3, 4]
    assert ids(queries.logs(db, status="4xx")) == [2, 4]
    assert ids(queries.logs(db, status="503")) == [3]
    assert ids(queries.logs(db, proxy="b")) == [3]
    assert ids(queries.logs(db, code="proxy-access-denied")) == [2, 4]
    assert ids(queries.logs(db, since="1d")) == [1, 2, 3]
    assert ids(queries.logs(db, limit=2)) == [3, 4]
    assert ids(queries.logs(db, after=f"{2:026d}")) == [3, 4]


@pytest.mark.parametrize("since", ["15m", "2h", "1d", "2026-11-21T10:00:00Z", "2026-11-21"])
def test_since_forms(since: str) -> None:
    assert queries.since_iso(since).endswith("Z")


@pytest.mark.parametrize(("bad", "option"), [("yesterday", "since_iso"), ("2x", "status_clause")])
def test_bad_filters_say_what_to_write(bad: str, option: str) -> None:
    with pytest.raises(ValueError, match="use"):
        getattr(queries, option)(bad)


def test_curl_command_masks_and_names_the_upstream_proxy(db: Database) -> None:
    config = Config.model_validate(
        {
            "upstream_proxies": {
                "corp": {
                    "host": "proxy.corp",
                    "port": 3128,
                    "auth": {"type": "basic", "user": "svc", "password": "pw-secret"},
                }
            }
        }
    )
    row = {
        "id": "r1",
        "method": "POST",
        "proxy_code": "proxy-access-granted",
        "target_url": "https://api.example.com/v1/x?key=********",
        "request_headers": json.dumps(
            {
                "authorization": "********",
                "content-type": "application/json",
                "host": "api.example.com",
            }
        ),
        "upstream_proxy": "corp",
    }
    command = queries.curl_command(row, config)
    assert command == (
        "curl -X POST 'https://api.example.com/v1/x?key=********' -H 'authorization: ********' "
        "-H 'content-type: application/json' --proxy http://proxy.corp:3128 --proxy-user 'svc:********'"
    )
    assert "pw-secret" not in command
    with pytest.raises(ValueError, match="was not forwarded"):
        queries.curl_command(
            {**row, "target_url": None, "proxy_code": "proxy-access-denied"}, config
        )
