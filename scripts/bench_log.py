"""The activity log at scale: `keyswap stats` and `keyswap logs` on a generated log.

    .venv/bin/python scripts/bench_log.py [--rows 1000000] [--db PATH] [--runs 3]

Makes (or reuses) a log of --rows rows like a busy gateway's, 30 days of it
(tests/support/synthetic_log.py; about 1 KB a row with its indexes), then reports, best of
--runs:

  stats, in process   queries.stats(): wall and CPU time, and the peak of Python's own
                      allocations (tracemalloc; SQLite's page cache and sorter are not
                      Python allocations, the peak RSS below includes them)
  stats --since 1d    the same over the last day
  keyswap stats       the command: wall time and peak RSS of the process, beside those of
                      `keyswap --version` (the command line's start-up alone)
  logs ...            queries.logs() with each filter, newest 50 rows: wall time
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support.synthetic_log

from keyswap.state import migrations, queries  # noqa: E402
from keyswap.state.backends import open_backend  # noqa: E402
from tests.support.activity import sqlite_log  # noqa: E402
from tests.support.synthetic_log import fill  # noqa: E402

KEYSWAP = Path(sys.executable).parent / "keyswap"
FILTERS = [
    {},
    {"proxy": "maps"},
    {"status": "5xx"},
    {"status": "2xx"},
    {"status": "429"},
    {"code": "proxy-error"},
    {"since": "1h"},
    {"proxy": "maps", "status": "5xx"},
    {"status": "1xx"},  # matches nothing: the worst case of a filter
]


def log_of(path: Path, rows: int) -> None:
    """Reuse the file when it is a log of this size and schema, else make it anew."""
    if path.exists():
        with open_backend(path) as backend, backend.session() as session:
            version = migrations.version(session)
            [found] = session.query("select count(*) as n from requests")
        if version == migrations.SCHEMA_VERSION and found["n"] == rows:
            print(f"reusing {path} ({rows:,} rows)")
            return
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    print(f"making {path}: {rows:,} rows ...", flush=True)
    started = time.perf_counter()
    db = sqlite_log(path)
    fill(db, rows)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    size = path.stat().st_size / 2**20
    print(f"  made in {time.perf_counter() - started:.0f} s, {size:,.0f} MiB")


def best(runs: int, action: Callable[[], object]) -> tuple[float, float, int]:
    """The fastest of `runs`: wall seconds, CPU seconds, peak Python allocation (bytes)."""
    results = []
    for _ in range(runs):
        tracemalloc.start()
        wall, cpu = time.perf_counter(), time.process_time()
        action()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        results.append((wall, cpu, peak))
    return min(results)


def command(runs: int, args: list[str]) -> tuple[float, int]:
    """The fastest of `runs` of a command: wall seconds and peak RSS (KiB)."""
    results = []
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"{' '.join(args)} exited with {proc.returncode}")
        results.append((time.perf_counter() - started, usage.ru_maxrss))
    return min(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, help="default: keyswap-bench-log-ROWS.db in /tmp")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    path = args.db or Path(tempfile.gettempdir()) / f"keyswap-bench-log-{args.rows}.db"
    log_of(path, args.rows)
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} cores, load average {load:.1f}; best of {args.runs}")
    with open_backend(path) as backend, backend.session() as db:
        for label, since in (("stats, in process", None), ("stats --since 1d", "1d")):
            wall, cpu, peak = best(args.runs, lambda s=since: queries.stats(db, s))
            kib = peak / 1024
            print(f"  {label:<22} {wall:6.2f} s  (CPU {cpu:.2f} s)  Python peak {kib:,.0f} KiB")
        for label, argv in (
            ("keyswap stats", [str(KEYSWAP), "stats", "--db", str(path), "--config", "none.yaml"]),
            ("keyswap --version", [str(KEYSWAP), "--version"]),
        ):
            wall, rss = command(args.runs, argv)
            print(f"  {label:<22} {wall:6.2f} s  peak RSS {rss / 1024:,.0f} MiB")
        for filters in FILTERS:
            where = queries.LogFilter.of(**filters)
            wall, _, _ = best(args.runs, lambda w=where: queries.logs(db, w))
            shown = " ".join(f"--{k} {v}" for k, v in filters.items()) or "(no filter)"
            print(f"  logs {shown:<30} {wall * 1000:7.1f} ms")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {rss:,.0f} MiB")


if __name__ == "__main__":
    main()
