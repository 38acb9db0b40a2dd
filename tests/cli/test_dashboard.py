"""`keyswap dashboard`: the command's checks and errors, and the Datasette it serves,
driven in-process over ASGI: every chart's data as the dashboard page asks for it, the
`requests` table's defaults, the canned queries, a database of any name, and no write
ever. Also: `datasette keyswap.db -m config/datasette.yaml` still works."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import sqlite3
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from click.testing import CliRunner

from keyswap.cli import dashboard as command
from keyswap.cli.main import main
from keyswap.state import dashboard as views
from tests.support import ROOT
from tests.support.activity import write_log
from tests.support.processes import BIN

# Datasette 0.65 opens throwaway SQLite connections that it never closes (on import,
# for its SQLite version). They would fail whichever test the garbage collector frees
# them in, so they are freed here, where their warning is expected.
UNCLOSED = "ignore:unclosed database:ResourceWarning"
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "unclosed database", ResourceWarning)
    import datasette.app  # noqa: F401

    gc.collect()
pytestmark = pytest.mark.filterwarnings(UNCLOSED)


@pytest.fixture(autouse=True)
def collect_datasettes_connections() -> Iterator[None]:
    yield
    gc.collect()


RENDER = re.compile(r"renderChart\('([^']+)', (.*), '([^']*)', '([^']*)'(?:, true)?\)$", re.M)


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A week of traffic in a file whose name Datasette's URLs cannot carry as it is."""
    path = tmp_path_factory.mktemp("dash") / "gw.prod.db"
    write_log(path, per_hour=120)
    return path


class Served:
    """What `keyswap dashboard` serves for a database, called in-process."""

    def __init__(self, path: Path) -> None:
        self.name = views.served_name(path)
        self.datasette = command.datasette_for(path, self.name)
        self.app = command.with_table_defaults(
            self.datasette.app(), self.name, views.HIDDEN_COLUMNS
        )

    def get(self, *paths: str) -> list[httpx.Response]:
        async def run() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://dash") as client:
                return [await client.get(path) for path in paths]

        return asyncio.run(run())

    def close(self) -> None:
        # Datasette keeps its connections open for the life of the process; a test closes
        # them (on the Database objects, where they are without SQL threads).
        for database in self.datasette.databases.values():
            database.close()
            for conn in (database._read_connection, database._write_connection):
                if conn is not None:
                    conn.close()


@pytest.fixture
def dash(log: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    monkeypatch.setitem(command.SETTINGS, "num_sql_threads", 0)
    served = Served(log)
    yield served
    served.close()


def chart_requests(page: str) -> dict[str, str]:
    """What the dashboard page's script fetches for each chart (dashboards.js)."""
    found = {}
    for slug, chart, query_string, _ in RENDER.findall(page):
        spec = json.loads(chart)
        found[slug] = f"/{spec['db']}.json?sql={quote(spec['query'])}&{query_string}&_shape=objects"
    return found


def test_every_chart_gets_its_data_as_the_dashboard_asks(dash: Served) -> None:
    assert dash.name == "gw_prod"
    bare, page = dash.get("/-/dashboards/keyswap", "/-/dashboards/keyswap?last=24+hours")
    assert bare.status_code == 302  # to the filters' defaults
    assert bare.headers["location"].endswith("/-/dashboards/keyswap?last=24+hours")
    assert page.status_code == 200
    wanted = chart_requests(page.text)
    assert set(wanted) == set(views.charts(dash.name))
    for slug, answer in zip(wanted, dash.get(*wanted.values()), strict=True):
        assert answer.status_code == 200, (slug, answer.text)
        body = answer.json()
        assert body["ok"] and body["rows"] and not body["truncated"], (slug, body)


def test_the_proxy_filter_reaches_every_chart(dash: Served) -> None:
    (page,) = dash.get("/-/dashboards/keyswap?last=7+days&proxy=crm-prod")
    assert '<option value="crm-prod" selected>' in page.text
    wanted = chart_requests(page.text)
    assert all(quote("and proxy_id = :proxy") in url for url in wanted.values())
    answers = dict(zip(wanted, dash.get(*wanted.values()), strict=True))
    assert {r["proxy"] for r in answers["per_proxy"].json()["rows"]} == {"crm-prod"}
    assert {r["token"].split(" / ")[0] for r in answers["tokens"].json()["rows"]} == {"crm-prod"}
    (everyone,) = dash.get("/-/dashboards/keyswap?last=7+days&proxy=")
    assert all(quote("proxy_id = :proxy") not in u for u in chart_requests(everyone.text).values())


def test_a_chart_page_without_filters_shows_the_default_window(dash: Served) -> None:
    (page,) = dash.get("/-/dashboards/keyswap/per_proxy")
    (url,) = chart_requests(page.text).values()
    (data,) = dash.get(url)
    assert data.status_code == 200 and len(data.json()["rows"]) > 50


def test_the_requests_table_newest_first_for_a_day_without_header_columns(dash: Served) -> None:
    table_url = f"/{dash.name}/requests"
    bare, as_json = dash.get(table_url, f"{table_url}.json?_shape=objects")
    assert bare.status_code == 302
    location = bare.headers["location"]
    hidden = "&".join(f"_nocol={c}" for c in views.HIDDEN_COLUMNS)
    assert re.fullmatch(
        rf"{table_url}\?started_at__gte=[-0-9T%A.]+Z&{hidden}&_defaults=1", location
    )
    # and "Show all columns", which keeps the marker of the defaults
    table, everything = dash.get(location, f"{table_url}?_defaults=1")
    assert table.status_code == 200
    assert "col-request_headers" not in table.text and "col-started_at" in table.text
    assert "facets-timed-out" not in table.text
    for facet in views.FACETS:
        assert f'data-column="{facet}"' in table.text
    assert everything.status_code == 200 and "col-request_headers" in everything.text
    rows = as_json.json()["rows"]  # the JSON API is not redirected: it has every column
    assert "request_headers" in rows[0]
    stamps = [r["started_at"] for r in rows]
    assert stamps == sorted(stamps, reverse=True) and len(stamps) > 10


def test_canned_queries_and_tables(dash: Served) -> None:
    paths = [f"/{dash.name}/{q}.json?_shape=objects" for q in views.QUERIES]
    paths += [f"/{dash.name}.json", "/-/dashboards", f"/{dash.name}/audit"]
    *queries, database, dashboards, audit = dash.get(*paths)
    for answer in queries:
        assert answer.status_code == 200 and answer.json()["ok"], answer.text
    assert queries[1].json()["rows"]  # the slowest requests of the day
    assert {q["name"] for q in database.json()["queries"]} == set(views.QUERIES)
    shown = {t["name"] for t in database.json()["tables"] if not t["hidden"]}
    assert "requests" in shown and "oauth2_tokens" not in shown
    assert dashboards.status_code == 200 and "/-/dashboards/keyswap" in dashboards.text
    assert audit.status_code == 200


def test_the_dashboard_never_writes(dash: Served, log: Path) -> None:
    database = dash.datasette.get_database(dash.name)
    with pytest.raises(PermissionError, match="never writes"):
        database.connect(write=True)
    conn = database.connect()  # closed with the others
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("insert into audit (at, action) values ('now', 'edit')")
    delete = quote("delete from requests")
    (answer,) = dash.get(f"/{dash.name}.json?sql={delete}")
    assert answer.status_code == 400
    with closing(sqlite3.connect(log)) as check:
        assert check.execute("select count(*) from requests").fetchone()[0] > 1000


def test_the_example_file_works_with_plain_datasette(tmp_path: Path) -> None:
    """The documented `datasette keyswap.db -m config/datasette.yaml`, run for real."""
    path = tmp_path / "keyswap.db"
    write_log(path, per_hour=60, days=1)
    datasette = [str(BIN / "datasette"), str(path), "-m", str(ROOT / "config" / "datasette.yaml")]
    for get, expect in [
        ("/-/dashboards/keyswap?last=24+hours", "renderChart('per_proxy'"),
        ("/keyswap/slowest_requests.json?_shape=array", '"target_url"'),
        ("/keyswap/requests.json?_facet=proxy_id&_size=1", '"facet_results"'),
    ]:
        done = subprocess.run(
            [*datasette, "--get", get], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert expect in done.stdout


def test_metadata_prints_what_the_example_file_holds(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["dashboard", "--db", "keyswap.db", "--metadata"])
    assert result.exit_code == 0, result.output
    assert result.output == (ROOT / "config" / "datasette.yaml").read_text()
    config = tmp_path / "prod" / "keyswap.yaml"  # the database beside it, named by the file
    result = CliRunner().invoke(main, ["dashboard", "--config", str(config), "--metadata"])
    assert result.output == views.metadata_yaml("keyswap")
    result = CliRunner().invoke(main, ["dashboard", "--db", "gw.prod.db", "--metadata"])
    assert "  gw.prod:\n" in result.output  # the name Datasette gives that file


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no activity log at"),
        (b"not a database, just text" * 100, "cannot read"),
        ("sqlite", "is not a keyswap activity log (no requests table)"),
    ],
)
def test_refuses_what_is_not_an_activity_log(
    tmp_path: Path, content: bytes | str | None, message: str
) -> None:
    path = tmp_path / "x.db"
    if content == "sqlite":
        with closing(sqlite3.connect(path)) as conn:
            conn.execute("create table other (a)")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    result = CliRunner().invoke(main, ["dashboard", "--db", str(path)])
    assert result.exit_code == 1
    assert message in result.output


@pytest.mark.parametrize("extra", [[], ["--metadata"]])
def test_says_it_serves_sqlite_only(extra: list[str]) -> None:
    url = "postgresql://gw:dash-secret@db.internal/keyswap"
    result = CliRunner().invoke(main, ["dashboard", "--db", url, *extra])
    assert result.exit_code == 1
    assert "serves an SQLite activity log with Datasette" in result.output
    assert "postgresql://gw:********@db.internal/keyswap is PostgreSQL" in result.output
    assert "dash-secret" not in result.output


def test_without_datasette_says_what_to_install(log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasette.app", None)  # import fails
    result = CliRunner().invoke(main, ["dashboard", "--db", str(log)])
    assert result.exit_code == 1
    assert "pip install 'keyswap[datasette]'" in result.output


def test_serves_on_the_address_given(log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    runs: list[dict[str, Any]] = []
    opened: list[str] = []

    class Now:  # the browser is opened at once, not from a timer thread
        def __init__(self, _delay: float, action: Any, args: list[str]) -> None:
            self.action, self.args = action, args

        def start(self) -> None:
            self.action(*self.args)

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: runs.append({"app": app, **kw}))
    monkeypatch.setattr(command.threading, "Timer", Now)
    monkeypatch.setattr(command.webbrowser, "open", opened.append)
    result = CliRunner().invoke(main, ["dashboard", "--db", str(log), "--port", "8123", "--open"])
    assert result.exit_code == 0, result.output
    url = "http://127.0.0.1:8123/-/dashboards/keyswap"
    assert f"(read-only) at {url}" in result.output
    assert "warning" not in result.output
    assert opened == [url]
    assert runs[0]["host"] == "127.0.0.1" and runs[0]["port"] == 8123
    result = CliRunner().invoke(main, ["dashboard", "--db", str(log), "--host", "0.0.0.0"])
    assert "warning: the dashboard has no login" in result.output
    assert runs[1]["host"] == "0.0.0.0"
    result = CliRunner().invoke(main, ["dashboard", "--db", str(log), "--host", "::1"])
    assert "http://[::1]:8001/" in result.output and "warning" not in result.output
