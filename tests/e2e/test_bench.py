"""scripts/bench --quick produces a complete results.json: a smoke test, not a timing test."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.postgres import have_postgres

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (shutil.which("wrk") and shutil.which("nginx")), reason="wrk and nginx"),
]


def test_quick_bench_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [
            str(ROOT / "scripts" / "bench"),
            "--quick",
            "--duration",
            "1",
            "--stream-mib",
            "8",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert {
        "machine",
        "versions",
        "settings",
        "upstream_rps",
        "runs",
        "ratios",
        "log",
        "streaming",
        "goals",
    } <= set(report)
    assert report["versions"]["mitmproxy"].startswith("12.")
    for name in ("A", "B", "C"):
        run = report["runs"][name]
        assert all(run["rps"][str(c)] > 0 for c in report["settings"]["connections"])
        assert run["p50_ms"] > 0 and run["p99_ms"] >= run["p50_ms"] and run["peak_rss_mib"] > 0
    measured = have_postgres()  # else the backends phase says so and is skipped
    assert set(report["ratios"]) == {
        "B/A_rps_c1",
        "B/A_rps_c16",
        "B/A_rps_paired_c16",
        "B-A_p99_ms_c1",
        "W2/W1_rps_c16",
        "W2/A_rps_c16",
        "async/sync_accept_rps_c16",
        "async_delivery_W2/W1",
        "forward/reverse_http_rps_paired_c16",
        "forward/bare_http_rps_paired_c16",
        "forward/bare_https_rps_paired_c16",
        "forward/bare_https_new_connection_rps_paired_c16",
        "https/http_forward_rps_paired_c16",
    } | ({"PG/SQLite_rps_paired"} if measured else set())
    assert len(report["paired"]["rounds"]) == 1 and report["paired"]["B/A_rps"] > 0
    workers = report["workers"]  # keyswap serve --workers 2 vs --workers 1 vs bare mitmdump
    assert set(workers["rps"]) == {"A", "W1", "W2"} and all(v > 0 for v in workers["rps"].values())
    assert workers["W2/W1_rps"] > 0 and workers["connections"] == 16
    backends = report["backends"]  # keyswap on PostgreSQL vs on SQLite, paired
    if measured:
        assert len(backends["rounds"]) == 1 and backends["PG/SQLite_rps"] > 0
        assert all(n > 0 for n in backends["rows"].values())
        assert "keyswap on PostgreSQL" in done.stdout
    else:
        assert "backends: skipped: PostgreSQL is not installed" in done.stdout
    accepted = report["async"]  # respond-async accept rate, delivery with 1 and 2 workers
    assert all(v > 0 for v in accepted["accept_rps"].values())
    for figures in accepted["delivery"].values():
        assert figures["states"] == {"succeeded": 500} and figures["per_s"] > 0
    assert "respond-async accepted" in done.stdout
    forward = report["forward"]  # forward mode vs reverse and vs bare mitmdump, paired
    assert set(forward["pairs"]) == {
        "forward/reverse_http",
        "forward/bare_http",
        "forward/bare_https",
        "forward/bare_https_new_connection",
        "https/http_forward",
    }
    for key, pair in forward["pairs"].items():
        assert len(pair["rounds"]) == 1 and pair["ratio"] == forward[key] > 0
        assert len(pair["rps"]) == 2 and all(v > 0 for v in pair["rps"].values())
    assert set(forward["new_connection_ms"]) == {"keyswap", "bare"}
    assert "forward mode (paired, c=16)" in done.stdout
    assert "a new CONNECT + TLS connection" in done.stdout
    assert report["log"]["requests_sent"] == 500
    assert set(report["streaming"]) == {
        "download_rss_growth_mib",
        "upload_rss_growth_mib",
        "sse_first_event_s",
        "stream_mib",
    }
    assert len(report["goals"]) == 4 + measured and all(
        isinstance(v, bool) for v in report["goals"].values()
    )
    assert "B keyswap" in done.stdout and "goal" in done.stdout
    assert "W2 keyswap --workers 2" in done.stdout and "wrk on the same" in done.stdout
