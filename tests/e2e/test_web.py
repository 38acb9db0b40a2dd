"""`keyswap serve --web`: the gateway under a real mitmweb, watched through mitmweb's own
HTTP API (the one its UI uses).

- A mixed run (granted, denied and failing requests, some in flight at SIGTERM) with
  flows saved, every flow printed in full (`flow_detail=4`) and bodies in the activity
  log: no secret and no proxy token in the web API (polled while requests are in
  flight), the saved flows, the output, the database or the client's answers.
- What the UI shows: the decision column (`proxy · code`), the gateway's own URL on
  requests that went to no target, the listen address in the status bar; a replay is
  refused as a new request with its own row, and the target never sees it."""

from __future__ import annotations

import base64
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyswap.config.tokens import digest, new_token
from keyswap.gateway.stages.routing import REPLAY_MESSAGE
from tests.support.processes import BIN, Process, free_port, start, start_echo_target, wait_for_port
from tests.support.raw_target import RawTarget, raw_target

pytestmark = pytest.mark.e2e

SECRETS = {
    "bearer": "sk-web-bearer-1a2b3c",
    "basic": "pw-web-basic-4d5e6f",
    "header": "hdr-web-7a8b9c",
    "query": "qry-web-0d1e2f",
}
PASSWORD = "web-test-password"
XSRF = "keyswap-test-xsrf"  # tornado's double-submit check: the same value as cookie and header


def serve_web(
    config: Path, tmp_path: Path, *mitmproxy_args: str, password: str | None = PASSWORD
) -> tuple[Process, int]:
    """`keyswap serve --web` on free loopback ports: the gateway and mitmweb's port.
    Without a password, mitmweb makes a token and prints it in its URL."""
    port, web_port = free_port(), free_port()
    cmd = [str(BIN / "keyswap"), "serve", "--web", "--config", str(config)]
    cmd += ["--listen", f"127.0.0.1:{port}", "--db", str(tmp_path / "k.db"), "--"]
    cmd += ["--set", f"web_port={web_port}", "--set", "web_host=127.0.0.1"]
    cmd += ["--set", "web_open_browser=false"]
    if password is not None:
        cmd += ["--set", f"web_password={password}"]
    gateway = start([*cmd, *mitmproxy_args], port, tmp_path / "web.log")
    wait_for_port(web_port, gateway.proc)
    return gateway, web_port


def printed_token(gateway: Process, web_port: int) -> str:
    """The token of the URL mitmweb prints at start (`?token=...`)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = re.search(rf"http://127\.0\.0\.1:{web_port}/\?token=(\w+)", gateway.output())
        if found:
            return found.group(1)
        time.sleep(0.1)
    raise AssertionError(f"no mitmweb URL with a token in:\n{gateway.output()}")


def web_api(web_port: int, secret: str) -> httpx.Client:
    """mitmweb's API, authenticated with its password or token (as `Bearer`)."""
    return httpx.Client(
        base_url=f"http://127.0.0.1:{web_port}",
        headers={"authorization": f"Bearer {secret}", "x-xsrftoken": XSRF},
        cookies={"_mitmproxy_xsrf": XSRF},
        timeout=10,
    )


def test_mitmweb_never_shows_a_credential_even_in_flight(tmp_path: Path) -> None:
    echo = start_echo_target(tmp_path)
    tokens = {name: new_token() for name in [*SECRETS, "dead", "ruled"]}
    config = tmp_path / "keyswap.yaml"
    config.write_text(
        f"""\
version: 1
credentials:
  bearer: {{ type: bearer, token: "{SECRETS["bearer"]}" }}
  basic: {{ type: basic, username: svc, password: "{SECRETS["basic"]}" }}
  header: {{ type: header, name: x-api-key, value: "{SECRETS["header"]}" }}
  query: {{ type: query, name: key, value: "{SECRETS["query"]}" }}
targets:
"""
        + "".join(
            f'  {n}: {{ base_url: "http://127.0.0.1:{echo.port}", credential: {n} }}\n'
            for n in SECRETS
        )
        + f'  dead: {{ base_url: "http://127.0.0.1:{free_port()}", credential: bearer }}\n'
        + "proxies:\n"
        + "".join(
            f"  {n}: {{ target: {n}, tokens: [{{ id: t, sha256: {digest(tokens[n])} }}] }}\n"
            for n in SECRETS
        )
        + f"  dead: {{ target: dead, tokens: [{{ id: t, sha256: {digest(tokens['dead'])} }}] }}\n"
        + "  ruled: { target: bearer, rules: [{ deny: {} }], tokens: "
        + f"[{{ id: t, sha256: {digest(tokens['ruled'])} }}] }}\n"
    )
    flows_file = tmp_path / "flows.mitm"
    gateway, web_port = serve_web(
        config,
        tmp_path,
        *("--set", f"save_stream_file={flows_file}", "--set", "flow_detail=4"),
        *("--set", "keyswap_log_bodies=4096"),
    )
    port = gateway.port
    web = web_api(web_port, PASSWORD)
    results: list[httpx.Response] = []

    def call(name: str, path: str = "/slow?s=3") -> None:
        url = f"http://127.0.0.1:{port}/api/{name}{path}"
        headers = {"x-proxy-token": tokens[name]}
        results.append(httpx.get(url, headers=headers, timeout=30))

    def late(name: str) -> None:  # still in flight at SIGTERM: answered by the drain
        call(name, "/slow?s=2")

    basic = base64.b64encode(f"svc:{SECRETS['basic']}".encode()).decode()
    forbidden = [*SECRETS.values(), basic, *tokens.values()]
    seen: list[bytes] = []
    try:
        threads = [threading.Thread(target=call, args=(n,)) for n in SECRETS]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 2.5
        in_flight_polls = 0
        while time.monotonic() < deadline:  # the requests wait at the target for 3 s
            listing = web.get("/flows")
            dump = web.get("/flows/dump")
            assert listing.status_code == 200 and dump.status_code == 200
            seen += [listing.content, dump.content]
            flows = listing.json()
            if len(flows) == len(SECRETS) and all(not f.get("response") for f in flows):
                in_flight_polls += 1
                # the decision column is filled while the request is still in flight
                comments = sorted(f["comment"] for f in flows)
                assert comments == [
                    f"{n} · proxy-access-granted · forwarded to target '{n}'"
                    for n in sorted(SECRETS)
                ]
            time.sleep(0.1)
        for t in threads:
            t.join(30)
        assert [r.status_code for r in results] == [200] * len(SECRETS)
        call("dead", "/x")  # failing: 502
        call("ruled", "/x")  # denied by a rule: 403
        wrong = httpx.get(f"http://127.0.0.1:{port}/api/bearer/x?key={tokens['query']}")
        assert wrong.status_code == 401  # another proxy's token, in the query
        seen += [web.get("/flows").content, web.get("/flows/dump").content]
        decided = {
            (f["comment"].rsplit(" · ", 1)[0], f["marked"]) for f in web.get("/flows").json()
        }
        assert ("dead · proxy-error", "⚠") in decided
        assert ("ruled · proxy-access-denied", "⛔") in decided
        assert ("bearer · proxy-access-denied", "⛔") in decided  # the query token's proxy
        in_flight = [threading.Thread(target=late, args=(n,)) for n in SECRETS]
        for t in in_flight:
            t.start()
        time.sleep(0.7)
        gateway.proc.send_signal(signal.SIGTERM)
        gateway.proc.wait(30)
        for t in in_flight:
            t.join(30)
    finally:
        web.close()
        gateway.stop()
        echo.stop()
    assert in_flight_polls >= 3, "mitmweb was never polled while all requests were in flight"
    assert [r.status_code for r in results] == [200] * 4 + [502, 403] + [200] * 4
    assert any(b"********" in chunk for chunk in seen), "the flows show no masked credential"
    stored = b"".join(f.read_bytes() for f in tmp_path.glob("k.db*"))
    assert flows_file.read_bytes().count(b"slow") >= 8, "the flows were not saved"
    # the echo target reflects what it received; answers are checked for tokens only
    answers = b"".join(r.content for r in results) + wrong.content
    views = {
        "mitmweb": b"".join(seen),
        "output": gateway.output().encode(),
        "database": stored,
        "saved flows": flows_file.read_bytes(),
    }
    for secret in forbidden:
        for view, content in views.items():
            at = content.find(secret.encode())
            assert at < 0, f"{secret} in {view}: {content[max(0, at - 300) : at + 80]!r}"
    for token in tokens.values():
        assert token.encode() not in answers


def log_rows(db: Path) -> list[dict[str, Any]]:
    with closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("select * from requests order by id")]


def until[T](check: Callable[[], T | None], what: str, timeout: float = 10) -> T:
    """Poll `check()` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Watched:
    """One gateway under mitmweb, after a request of each kind; `shown` is mitmweb's
    flow list, by keyswap-request-id, and `ids` each request's id by kind."""

    gateway: Process
    web: httpx.Client
    target: RawTarget
    tokens: dict[str, str]
    sent: dict[str, httpx.Response]
    ids: dict[str, str]
    shown: dict[str, dict[str, Any]]
    db: Path

    def flows(self) -> dict[str, dict[str, Any]]:
        listing = self.web.get("/flows")
        assert listing.status_code == 200
        return {
            dict(f["response"]["headers"])["keyswap-request-id"]: f
            for f in listing.json()
            if f.get("response")
        }

    def flow(self, kind: str) -> dict[str, Any]:
        return self.shown[self.ids[kind]]


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    tmp_path = tmp_path_factory.mktemp("watched")
    tokens = {"bearer": new_token(), "query": new_token()}
    with raw_target() as target:
        config = tmp_path / "keyswap.yaml"
        config.write_text(
            f"""\
version: 1
credentials:
  bearer: {{ type: bearer, token: "{SECRETS["bearer"]}" }}
  query: {{ type: query, name: key, value: "{SECRETS["query"]}" }}
targets:
  raw: {{ base_url: "http://127.0.0.1:{target.port}/v1", credential: bearer }}
  rawq: {{ base_url: "http://127.0.0.1:{target.port}/v1", credential: query }}
proxies:
  bearer: {{ target: raw, rules: [{{ deny: {{ path: /admin/** }} }}],
            tokens: [{{ id: t, sha256: {digest(tokens["bearer"])} }}] }}
  query: {{ target: rawq, tokens: [{{ id: t, sha256: {digest(tokens["query"])} }}] }}
"""
        )
        gateway, web_port = serve_web(config, tmp_path, password=None)
        gw, token = gateway.url, {"x-proxy-token": tokens["bearer"]}
        try:
            with web_api(web_port, printed_token(gateway, web_port)) as web:
                sent = {
                    "granted": httpx.get(f"{gw}/api/bearer/x?a=1", headers=token),
                    "query": httpx.get(f"{gw}/api/query/q?key={tokens['query']}"),  # SDK style
                    "rule": httpx.get(f"{gw}/api/bearer/admin/x", headers=token),
                    "token": httpx.get(f"{gw}/api/bearer/x", headers={"x-proxy-token": "ks_no"}),
                    "route": httpx.get(f"{gw}/nowhere/x"),
                    "probe": httpx.get(f"{gw}/_keyswap/health"),
                    "bad probe": httpx.post(f"{gw}/_keyswap/health"),
                }
                statuses = {k: r.status_code for k, r in sent.items()}
                assert statuses == {
                    **{"granted": 200, "query": 200, "rule": 403, "token": 401},
                    **{"route": 404, "probe": 200, "bad probe": 405},
                }
                ids = {k: r.headers["keyswap-request-id"] for k, r in sent.items()}
                w = Watched(gateway, web, target, tokens, sent, ids, {}, tmp_path / "k.db")
                w.shown = until(lambda: len(f := w.flows()) == len(sent) and f, "every flow")
                yield w
        finally:
            gateway.stop()
    everything = target.everything
    assert f"Bearer {SECRETS['bearer']}".encode() in everything  # the swap did happen
    assert f"key={SECRETS['query']}".encode() in everything
    for never in (b"********", *(t.encode() for t in tokens.values())):
        assert never not in everything, "the target got a mask or a token"


def test_the_decision_column_says_proxy_and_code(watched: Watched) -> None:
    comments = {kind: watched.flow(kind)["comment"] for kind in watched.sent}
    assert comments == {
        "granted": "bearer · proxy-access-granted · forwarded to target 'raw'",
        "query": "query · proxy-access-granted · forwarded to target 'rawq'",
        "rule": "bearer · proxy-access-denied · a rule of this proxy denies the request",
        "token": "bearer · proxy-access-denied · the token is not valid for this proxy",
        "route": "- · proxy-access-denied · no proxy is configured for this path",
        "probe": "- · proxy-access-granted · health report",
        "bad probe": "- · proxy-access-denied · the health endpoint answers GET and HEAD",
    }
    marked = {kind for kind in watched.sent if watched.flow(kind)["marked"] == "⛔"}
    assert marked == {"rule", "token", "route", "bad probe"}
    columns = watched.web.get("/options").json()["web_columns"]["value"]
    assert columns == ["tls", "icon", "path", "method", "status", "comment", "size", "time"]


def test_a_refused_request_shows_the_gateway_url_never_the_placeholder(watched: Watched) -> None:
    def url(kind: str) -> str:
        r = watched.flow(kind)["request"]
        return f"{r['scheme']}://{r['pretty_host']}:{r['port']}{r['path']}"

    own = watched.gateway.url
    assert url("granted") == f"http://127.0.0.1:{watched.target.port}/v1/x?a=1"
    assert url("rule") == f"{own}/api/bearer/admin/x"
    assert url("token") == f"{own}/api/bearer/x"
    assert url("route") == f"{own}/nowhere/x"
    assert url("probe") == f"{own}/_keyswap/health"
    # (The server connection a refused flow never opened keeps mitmproxy's placeholder
    # address: it is the client connection's, shared by that connection's flows.)
    assert not any("unused.invalid" in str(f["request"]) for f in watched.shown.values())


def test_the_status_bar_shows_the_listen_address(watched: Watched) -> None:
    # mitmweb's status bar shows the options listen_host:listen_port (default *:8080).
    options = watched.web.get("/options").json()
    assert options["listen_host"]["value"] == "127.0.0.1"
    assert options["listen_port"]["value"] == watched.gateway.port
    servers = watched.web.get("/state").json()["servers"]
    assert [s["listen_addrs"] for s in servers.values()] == [[["127.0.0.1", watched.gateway.port]]]


def test_an_answered_probe_is_counted_by_health_not_logged(watched: Watched) -> None:
    logged = {watched.ids[kind] for kind in watched.sent if kind != "probe"}

    def rows() -> dict[str, dict[str, Any]] | None:
        found = {r["id"]: r for r in log_rows(watched.db)}
        return found if logged <= found.keys() else None

    rows_now = until(rows, "the rows")
    assert watched.ids["probe"] not in rows_now
    probes = [r for r in rows_now.values() if r["path"] == "/_keyswap/health"]
    assert [r["status"] for r in probes] == [405]  # a refused probe is a row
    report = httpx.get(f"{watched.gateway.url}/_keyswap/health").json()
    assert report["probes_served"] >= 2  # the fixture's, and this one


@pytest.mark.parametrize("kind", ["granted", "query", "rule"])
def test_a_replay_is_refused_as_a_new_request_and_never_reaches_the_target(
    watched: Watched, kind: str
) -> None:
    received = watched.target.everything
    flow_id = watched.flow(kind)["id"]
    assert watched.web.post(f"/flows/{flow_id}/replay").status_code == 200

    def replayed() -> dict[str, Any] | None:
        f = next(f for f in watched.web.get("/flows").json() if f["id"] == flow_id)
        return f if f.get("response", {}).get("status_code") == 403 and f["is_replay"] else None

    flow = until(replayed, f"the replay of {kind}")
    headers = dict(flow["response"]["headers"])
    new_id = headers["keyswap-request-id"]
    assert new_id != watched.ids[kind]
    assert headers["keyswap-proxy-code"] == "proxy-access-denied"
    assert headers["keyswap-proxy-message"] == REPLAY_MESSAGE
    body = watched.web.get(f"/flows/{flow_id}/response/content.data").json()
    assert (body["type"], body["request_id"]) == ("urn:keyswap:problem:replay", new_id)
    proxy = "query" if kind == "query" else "bearer"
    assert flow["comment"] == f"{proxy} · proxy-access-denied · {REPLAY_MESSAGE}"
    assert flow["marked"] == "⛔"
    request = flow["request"]
    assert (request["pretty_host"], request["port"]) == ("127.0.0.1", watched.gateway.port)
    row = until(
        lambda: next((r for r in log_rows(watched.db) if r["id"] == new_id), None),
        "the replay's row",
    )
    assert (row["proxy_id"], row["status"], row["proxy_code"]) == (
        proxy,
        403,
        "proxy-access-denied",
    )
    assert row["message"] == REPLAY_MESSAGE and row["target_url"] is None
    as_sent = watched.sent[kind].request.url.raw_path.decode()
    assert row["path"] == as_sent.replace(watched.tokens["query"], "********")
    time.sleep(0.5)  # a replay that did reach the target would have by now
    assert watched.target.everything == received, "a replay reached the target"
