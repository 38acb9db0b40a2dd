"""mitmweb, polled through its own API while requests are in flight and after they
completed, never shows a target credential: the flow only ever holds `********`."""

from __future__ import annotations

import base64
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
    tokens = {name: new_token() for name in SECRETS}
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
        + "proxies:\n"
        + "".join(
            f"  {n}: {{ target: {n}, tokens: [{{ id: t, sha256: {digest(tokens[n])} }}] }}\n"
            for n in SECRETS
        )
    )
    port, web_port = free_port(), free_port()
    cmd = [str(BIN / "keyswap"), "serve", "--web", "--config", str(config)]
    cmd += ["--listen", f"127.0.0.1:{port}", "--db", str(tmp_path / "k.db"), "--"]
    cmd += ["--set", f"web_port={web_port}", "--set", "web_host=127.0.0.1"]
    cmd += ["--set", f"web_password={PASSWORD}", "--set", "web_open_browser=false"]
    gateway = start(cmd, port, tmp_path / "web.log")
    web = httpx.Client(
        base_url=f"http://127.0.0.1:{web_port}",
        headers={"authorization": f"Bearer {PASSWORD}"},
        timeout=10,
    )
    results: list[httpx.Response] = []

    def call(name: str) -> None:
        url = f"http://127.0.0.1:{port}/api/{name}/slow?s=3"
        headers = {"x-proxy-token": tokens[name]}
        results.append(httpx.get(url, headers=headers, timeout=30))

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
        seen += [web.get("/flows").content, web.get("/flows/dump").content]
    finally:
        web.close()
        gateway.stop()
        echo.stop()
    assert in_flight_polls >= 3, "mitmweb was never polled while all requests were in flight"
    assert [r.status_code for r in results] == [200] * len(SECRETS)
    assert any(b"********" in chunk for chunk in seen), "the flows show no masked credential"
    everything = b"".join(seen) + gateway.output().encode()
    for secret in forbidden:
        assert secret.encode() not in everything, f"{secret} shown by mitmweb"
