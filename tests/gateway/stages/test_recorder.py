from pathlib import Path
from typing import Any

import pytest
import yaml
from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow
from mitmproxy.tools.web.app import flow_to_json

from keyswap.config.model import Config
from keyswap.config.secrets import Redaction
from keyswap.gateway import problem
from keyswap.gateway.settings import Settings
from keyswap.gateway.stages.health import Health
from keyswap.gateway.stages.recorder import Recorder, _preview, annotate
from keyswap.gateway.stages.routing import Router
from keyswap.state.backends import open_backend
from keyswap.state.writer import Writer
from tests.support import ROOT
from tests.support.activity import sqlite_log

CONFIG = Config.model_validate(
    {"credentials": {"b": {"type": "bearer", "token": "bearer-secret-3"}}}
)


def test_previews_mask_secrets_before_cutting() -> None:
    preview = _preview(b'{"token": "bearer-secret-3", "more": "data"}', 24, Redaction(CONFIG))
    assert preview == '{"token": "********", "m'
    assert _preview(b"0123456789bearer-secret-3", 15, Redaction(CONFIG)) == "0123456789*****"


class Rows:
    """Stands in for the writer thread: keeps what would be written."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, table: str, row: dict[str, Any]) -> None:
        assert table == "requests"
        self.rows.append(row)


def recorder(live_view: bool = False) -> tuple[Recorder, Rows]:
    rec, rows = Recorder(Settings()), Rows()
    rec.writer = rows  # type: ignore[assignment]
    rec.gateway_id = "gw-1:4242:abcdef"
    rec.live_view = live_view
    return rec, rows


def at_gateway(path: bytes = b"/nothing", **metadata: object) -> http.HTTPFlow:
    """A flow as reverse mode hands it to the stages: the placeholder host, also in Host."""
    flow = tflow.tflow(client_conn=tflow.tclient_conn())
    flow.client_conn.sockname = ("127.0.0.1", 8080)
    flow.client_conn.proxy_mode = ProxyMode.parse("reverse:http://unused.invalid@8080")
    flow.request = http.Request.make("GET", "http://unused.invalid" + path.decode())
    flow.request.data.path = path
    flow.metadata.update({problem.REQUEST_ID: "r1", **metadata})
    return flow


@pytest.mark.parametrize(
    ("proxy_id", "code", "message", "comment", "marked"),
    [
        ("crm", problem.DENIED, "wrong token", "crm · proxy-access-denied · wrong token", "⛔"),
        ("crm", problem.GRANTED, "forwarded", "crm · proxy-access-granted · forwarded", ""),
        ("crm", problem.PROXY_ERROR, "timeout", "crm · proxy-error · timeout", "⚠"),
        (None, problem.DENIED, "no proxy", "- · proxy-access-denied · no proxy", "⛔"),
    ],
)
def test_mitmweb_shows_proxy_and_code_first_in_the_comment(
    proxy_id: str | None, code: str, message: str, comment: str, marked: str
) -> None:
    flow = tflow.tflow()
    annotate(flow, proxy_id, code, message)
    assert flow.comment == comment
    assert flow_to_json(flow)["marked"] == marked  # what mitmweb's flow list shows


def test_a_refused_flow_shows_the_gateway_url_not_the_placeholder() -> None:
    rec, _ = recorder(live_view=True)
    flow = at_gateway(b"/api/crm/x?a=1", **{problem.PROXY: "crm"})
    problem.deny(flow, 401, "missing-token", "no token")
    rec.requestheaders(flow)
    assert flow.request.pretty_url == "http://127.0.0.1:8080/api/crm/x?a=1"
    assert flow.request.headers["host"] == "127.0.0.1:8080"
    assert flow.comment == "crm · proxy-access-denied · no token"


def test_a_granted_flow_keeps_its_target_url_and_shows_its_decision_in_flight() -> None:
    rec, _ = recorder(live_view=True)
    flow = at_gateway(b"/x", **{problem.PROXY: "crm", problem.DESTINATION: {}})
    flow.request.host, flow.request.port = "api.example", 443
    problem.decide(flow, problem.GRANTED, "forwarded to target 'crm'")
    rec.requestheaders(flow)
    assert flow.request.host == "api.example"
    assert flow.comment == "crm · proxy-access-granted · forwarded to target 'crm'"


def test_without_a_live_view_no_comment_is_made_in_flight() -> None:
    rec, _ = recorder(live_view=False)  # mitmdump: nothing shows a flow in flight
    flow = at_gateway(**{problem.DESTINATION: {}})
    problem.decide(flow, problem.GRANTED, "forwarded")
    rec.requestheaders(flow)
    assert flow.comment == ""


def test_an_answered_health_probe_is_no_row_but_a_refused_one_is() -> None:
    rec, rows = recorder()
    health = Health(Settings())
    answered, refused = at_gateway(b"/_keyswap/health"), at_gateway(b"/_keyswap/health")
    refused.request.method = "POST"
    for flow in (answered, refused):
        flow.metadata[problem.RESERVED] = True
        health.requestheaders(flow)
        rec.response(flow)
    assert health.probes_served == 1
    assert [(r["path"], r["status"]) for r in rows.rows] == [("/_keyswap/health", 405)]


def test_a_flow_gets_one_row_however_often_it_ends() -> None:
    rec, rows = recorder()
    flow = at_gateway()
    problem.deny(flow, 404, "unknown-route", "no proxy")
    rec.response(flow)
    rec.error(flow)
    assert len(rows.rows) == 1
    assert flow.comment == "- · proxy-access-denied · no proxy"
    # which listener mode, which gateway process (the registry's id)
    assert (rows.rows[0]["mode"], rows.rows[0]["gateway"]) == ("reverse", "gw-1:4242:abcdef")


def test_a_replayed_flow_is_a_new_row() -> None:
    """The router forgets the previous pass (its row flag too); the firewall's new id
    makes a new row."""
    rec, rows = recorder()
    flow = at_gateway(b"/x", **{problem.PATH: "/api/crm/x", problem.PROXY: "crm"})
    problem.decide(flow, problem.GRANTED, "forwarded")
    flow.metadata[problem.DESTINATION] = {"scheme": "http", "host": "t", "port": 80}
    flow.response = tflow.tresp()
    rec.response(flow)
    flow.response, flow.is_replay = None, "request"
    flow.metadata[problem.REQUEST_ID] = "r2"
    Router(Settings()).requestheaders(flow)
    rec.requestheaders(flow)
    rec.response(flow)
    assert [(r["id"], r["proxy_code"], r["status"]) for r in rows.rows] == [
        ("r1", problem.GRANTED, 200),
        ("r2", problem.DENIED, 403),
    ]
    assert rows.rows[1]["path"] == "/api/crm/x" and rows.rows[1]["target_url"] is None
    assert flow.request.pretty_url == "http://127.0.0.1:8080/api/crm/x"


def test_datasette_canned_queries_run_on_the_schema(tmp_path: Path) -> None:
    metadata = yaml.safe_load((ROOT / "config" / "datasette.yaml").read_text())
    queries = metadata["databases"]["keyswap"]["queries"]
    assert {"errors_last_hour", "slowest_requests", "volume_per_proxy_per_hour"} <= set(queries)
    db = sqlite_log(tmp_path / "keyswap.db")
    try:
        for query in queries.values():
            list(db.query(query["sql"]))
    finally:
        db.close()


def test_the_shutdown_line_says_what_was_written_in_words(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder(Settings())
    rec.backend = open_backend(tmp_path / "k.db")
    rec.writer = Writer(rec.backend)
    with caplog.at_level("INFO"):
        rec.done()
    line = next(r.getMessage() for r in caplog.records if "activity log closed" in r.getMessage())
    assert line == (
        f"keyswap: activity log closed: 0 rows written, 0 dropped, 0 failed ({tmp_path / 'k.db'})"
    )
