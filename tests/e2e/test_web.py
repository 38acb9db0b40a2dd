"""A mixed run under mitmweb (granted, denied and failing requests, some in flight at
SIGTERM) with flows saved, every flow printed in full (`flow_detail=4`) and bodies in
the activity log: no secret and no proxy token in the web API (polled while requests
are in flight), the saved flows, the output, the database or the client's answers."""

from __future__ import annotations

import base64
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from keyswap.config.tokens import digest, new_token
from tests.support.processes import BIN, free_port, start, start_echo_target

pytestmark = pytest.mark.e2e

SECRETS = {
    "bearer": "sk-web-bearer-1a2b3c",
    "basic": "pw-web-basic-4d5e6f",
    "header": "hdr-web-7a8b9c",
    "query": "qry-web-0d1e2f",
}
PASSWORD = "web-test-password"


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
    port, web_port = free_port(), free_port()
    cmd = [str(BIN / "keyswap"), "serve", "--web", "--config", str(config)]
    cmd += ["--listen", f"127.0.0.1:{port}", "--db", str(tmp_path / "k.db"), "--"]
    cmd += ["--set", f"web_port={web_port}", "--set", "web_host=127.0.0.1"]
    cmd += ["--set", f"web_password={PASSWORD}", "--set", "web_open_browser=false"]
    flows_file = tmp_path / "flows.mitm"
    cmd += ["--set", f"save_stream_file={flows_file}", "--set", "flow_detail=4"]
    cmd += ["--set", "keyswap_log_bodies=4096"]
    gateway = start(cmd, port, tmp_path / "web.log")
    web = httpx.Client(
        base_url=f"http://127.0.0.1:{web_port}",
        headers={"authorization": f"Bearer {PASSWORD}"},
        timeout=10,
    )
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
            time.sleep(0.1)
        for t in threads:
            t.join(30)
        assert [r.status_code for r in results] == [200] * len(SECRETS)
        call("dead", "/x")  # failing: 502
        call("ruled", "/x")  # denied by a rule: 403
        wrong = httpx.get(f"http://127.0.0.1:{port}/api/bearer/x?key={tokens['query']}")
        assert wrong.status_code == 401  # another proxy's token, in the query
        seen += [web.get("/flows").content, web.get("/flows/dump").content]
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
