"""`keyswap dashboard` as a user meets it: a real process on a free loopback port, over an
activity log that a writer keeps appending to as a running gateway does, and a real
headless Chromium (the Debian package `chromium`) loading every page of the dashboard:
each chart renders its marks, with no JavaScript error and no failed request; the
gateway's writes are never refused and show up in the dashboard.

`KEYSWAP_SCREENSHOT=1` also saves the main dashboard as docs/dashboard.png (the README's
and docs/activity-log.md's picture):

    KEYSWAP_SCREENSHOT=1 .venv/bin/pytest tests/e2e/test_dashboard.py
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from keyswap.state import dashboard as views
from tests.support import ROOT
from tests.support.activity import live_row, write_log
from tests.support.chromium import Chromium, Page, find_chromium
from tests.support.processes import BIN, free_port, start

pytestmark = pytest.mark.e2e

SCREENSHOT = ROOT / "docs" / "dashboard.png"
VEGA_CHARTS = [slug for slug, c in views.charts("x").items() if c["library"] == "vega-lite"]
METRICS = [slug for slug, c in views.charts("x").items() if c["library"] == "metric"]

# What each chart holds once drawn, on the dashboard or alone on its page, by slug: the
# number of a metric, the marks of a Vega-Lite view (its SVG paths: areas, lines, bars).
DRAWN = """(() => Object.fromEntries([...document.querySelectorAll('.dashboard-card-chart, .chart-container')].map(
  card => [card.id.replace(/^chart-/, ''), {
    number: card.querySelector('p') ? card.querySelector('p').textContent : null,
    svg: !!card.querySelector('svg.marks'),
    marks: card.querySelectorAll('g.mark-area path, g.mark-line path, g.mark-rect path').length,
    text: card.textContent,
  }])))()"""
ALL_DRAWN = f"""(() => {{ const cards = Object.values({DRAWN});
  return cards.length > 0 && cards.every(c => c.number !== null || c.svg) }})()"""


def chromium_or_skip() -> str:
    found = find_chromium()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: apt-get install chromium")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    return found


@dataclass
class LiveWriter:
    """Appends a row every 20 ms, as a running gateway does, never waiting for a lock:
    a reader that held one would make a write fail here."""

    path: Path
    written: int = 0
    refused: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def finish(self) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join(10)

    def run(self) -> None:
        rng = random.Random(7)
        with closing(sqlite3.connect(self.path, timeout=0)) as conn:
            while not self.stop.wait(0.02):
                row = live_row(rng, 10_000_000 + self.written)
                columns = ", ".join(row)
                marks = ", ".join("?" * len(row))
                try:
                    with conn:
                        conn.execute(
                            f"insert into requests ({columns}) values ({marks})",  # noqa: S608
                            list(row.values()),
                        )
                    self.written += 1
                except sqlite3.OperationalError as e:
                    self.refused.append(str(e))


@contextmanager
def writing(path: Path) -> Iterator[LiveWriter]:
    """A writer appending to `path` until the block ends or it is `finish`ed."""
    gateway = LiveWriter(path)
    gateway.thread = threading.Thread(target=gateway.run, daemon=True)
    gateway.thread.start()
    try:
        yield gateway
    finally:
        gateway.finish()


def visit(page: Page, url: str, ready: str = "document.readyState === 'complete'") -> None:
    page.goto(url, ready)
    assert page.errors() == [], f"{url}: {page.errors()}"


def test_every_dashboard_page_renders_in_a_browser(tmp_path: Path) -> None:
    chromium = chromium_or_skip()
    db = tmp_path / "gateway.db"
    rows = write_log(db)
    name = views.served_name(db)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    board = f"{base}/-/dashboards/{views.DASHBOARD}"
    started = time.monotonic()
    cmd = [str(BIN / "keyswap"), "dashboard", "--db", str(db), "--port", str(port)]
    dashboard = start(cmd, port, tmp_path / "dashboard.log")
    try:
        with Chromium(chromium, tmp_path) as browser:
            page = browser.page(width=1280, height=900)
            visit(page, f"{base}/-/dashboards", "!!document.querySelector('a[href$=\"/keyswap\"]')")
            # first, as the generated day left it: the screenshot's data
            main_dashboard(page, board, tmp_path / "dashboard.png")
            with writing(db) as gateway:
                # a week of one proxy
                visit(page, f"{board}?last=7+days&proxy=crm-prod", ALL_DRAWN)
                drawn = page.evaluate(DRAWN)
                assert "crm-prod / sales-app" in drawn["tokens"]["text"]
                assert "openai-agents" not in drawn["tokens"]["text"]
                assert drawn["per_proxy"]["marks"] > 0 and drawn["upstream"]["marks"] > 0
                # each chart on its own page, with the filters and without any
                for slug in views.charts("x"):
                    for query in ("?last=6+hours", ""):
                        visit(page, f"{board}/{slug}{query}", ALL_DRAWN)
                requests_table(page, f"{base}/{name}/requests")
                # Datasette's own pages and the canned queries
                for path in ["/", f"/{name}", f"/{name}/audit"]:
                    visit(page, base + path)
                for query in views.QUERIES:
                    visit(page, f"{base}/{name}/{query}", "!!document.querySelector('h1')")
                browse_s = time.monotonic() - started

                # What the gateway wrote meanwhile is in the dashboard: no stale copy.
                gateway.finish()
                count = quote("select count(*) as n from requests")
                answer = httpx.get(f"{base}/{name}.json?sql={count}&_shape=array", timeout=30)
                assert answer.json() == [{"n": rows + gateway.written}]
    finally:
        dashboard.stop()
    assert gateway.refused == [], "the dashboard held a lock the gateway needed"
    assert gateway.written > 20
    print(f"browser test: {browse_s:.1f} s, {gateway.written} rows written meanwhile")


def main_dashboard(page: Page, board: str, shot: Path) -> None:
    """Redirected to the default window, every chart drawn with marks; its screenshot."""
    visit(page, board, ALL_DRAWN)
    assert page.evaluate("location.search") == "?last=24+hours"
    drawn = page.evaluate(DRAWN)
    assert set(drawn) == set(views.charts("x"))
    for slug in VEGA_CHARTS:
        assert drawn[slug]["marks"] > 0, (slug, drawn[slug])
    for slug in METRICS:
        assert drawn[slug]["number"].strip()[0].isdigit(), (slug, drawn[slug])
    page.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    if os.environ.get("KEYSWAP_SCREENSHOT"):
        shutil.copyfile(shot, SCREENSHOT)
    page.resize(900)


def requests_table(page: Page, url: str) -> None:
    """The last day, newest first, the header columns hidden, the facets."""
    visit(page, url, "!!document.querySelector('table.rows-and-columns')")
    table = page.evaluate(
        """({
          search: location.search,
          columns: [...document.querySelectorAll('table.rows-and-columns th')].map(
            th => th.className),
          started: [...document.querySelectorAll('td.col-started_at')].map(
            td => td.textContent.trim()),
          facets: [...document.querySelectorAll('.facet-info')].map(f => f.dataset.column),
        })"""
    )
    assert "started_at__gte=" in table["search"]
    assert "_nocol=request_headers" in table["search"]
    assert not [c for c in table["columns"] if "request_headers" in c]
    assert table["started"] == sorted(table["started"], reverse=True)
    assert set(views.FACETS) <= set(table["facets"])
