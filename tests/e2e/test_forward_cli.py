"""End to end, forward mode from the command line: `keyswap serve --forward` runs (alone,
and beside --listen with --workers 2), and `keyswap run` finds it in the registry and
runs real programs through it: the openai SDK and httpx (SSL_CERT_FILE), requests
(REQUESTS_CA_BUNDLE), curl (CURL_CA_BUNDLE, the lower-case proxy variables). The
programs trust keyswap's CA for the targets it intercepts and the machine's own CAs for
a passthrough host (its real certificate), through the one bundle keyswap run gives
them. The machine's CAs are the test's here: `SSL_CERT_FILE` names the targets' CA when
keyswap run starts, as a corporate bundle would."""

from __future__ import annotations

import json
import os
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from keyswap.cli.gateways import listener_url
from keyswap.config.tokens import digest, new_token
from tests.support.flaky_target import FlakyTarget
from tests.support.processes import BIN, Process, free_port, start

pytestmark = pytest.mark.e2e

SECRET = "sk-run-openai-secret-6b7c8d"


@dataclass
class Targets:
    """An HTTPS target keyswap intercepts (localhost) and a passthrough host (127.0.0.2),
    both with certificates of the targets' own CA."""

    api: FlakyTarget
    passthrough: FlakyTarget
    ca: Path  # the targets' CA: the machine's trust in this test
    tmp: Path


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Targets]:
    tmp = tmp_path_factory.mktemp("forward-cli")
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(tmp / "target-ca.pem"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost", "127.0.0.2").configure_cert(server)
    api = FlakyTarget(default="echo", tls=server)
    passthrough = FlakyTarget(default="200", host="127.0.0.2", tls=server)
    yield Targets(api, passthrough, tmp / "target-ca.pem", tmp)
    api.close()
    passthrough.close()


@dataclass
class Gateway:
    process: Process
    config: Path
    db: Path
    token: str

    def run(self, *cmd: str, **env: str) -> subprocess.CompletedProcess[str]:
        """`keyswap run --proxy agent -- CMD` with the agent's token in $KEYSWAP_TOKEN."""
        argv = [str(BIN / "keyswap"), "run", "--config", str(self.config), "--db", str(self.db)]
        return subprocess.run(
            [*argv, "--proxy", "agent", "--", *cmd],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "KEYSWAP_TOKEN": self.token, **env},
        )

    def rows(self) -> list[dict[str, object]]:
        """The forward-mode rows of the activity log, once there are some (batched)."""
        deadline = time.monotonic() + 10
        while True:
            with closing(sqlite3.connect(self.db)) as conn:
                conn.row_factory = sqlite3.Row
                rows = conn.execute("select * from requests where mode = 'forward'")
                found = [dict(r) for r in rows]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


@contextmanager
def serve(targets: Targets, name: str, *listeners: str) -> Iterator[Gateway]:
    """`keyswap serve` with these listener options, once it is in the registry."""
    folder = targets.tmp / name
    folder.mkdir()
    token = new_token()
    config = folder / "keyswap.yaml"
    config.write_text(f"""\
version: 1
credentials:
  openai: {{ type: bearer, token: "${{env:RUN_OPENAI_KEY}}" }}
targets:
  openai:
    base_url: "https://localhost:{targets.api.port}/v1"
    credential: openai
    tls: {{ ca_file: {targets.ca} }}
proxies:
  agent: {{ target: openai, template: openai, tokens: [{{ id: t, sha256: {digest(token)} }}] }}
forward:
  passthrough: [127.0.0.2]
""")
    db = folder / "keyswap.db"
    cmd = [str(BIN / "keyswap"), "serve", "--config", str(config), "--db", str(db), *listeners]
    forward_port = int(listeners[listeners.index("--forward") + 1].rsplit(":", 1)[1])
    process = start(cmd, forward_port, folder / "serve.log", {"RUN_OPENAI_KEY": SECRET})
    try:
        deadline = time.monotonic() + 30
        while listener_url(str(config), str(db), "forward") is None:
            assert time.monotonic() < deadline, process.output()
            time.sleep(0.1)
        yield Gateway(process, config, db, token)
    finally:
        assert process.stop() == 0, process.output()
    output = process.output()
    assert SECRET not in output and token not in output


@pytest.fixture(scope="module")
def forward_only(targets: Targets) -> Iterator[Gateway]:
    with serve(targets, "forward-only", "--forward", f"127.0.0.1:{free_port()}") as gateway:
        yield gateway


# The program: the openai SDK, unmodified (its key from OPENAI_API_KEY, its transport
# httpx), then requests to the passthrough host. Exits 5: keyswap run's status is its.
PROGRAM = """
import json, os, sys
import openai, requests
raw = openai.OpenAI().models.with_raw_response.list()
echoed = json.loads(raw.http_response.text)
passthrough = requests.get(sys.argv[1])
print(json.dumps({
    "status": raw.http_response.status_code,
    "code": raw.http_response.headers["keyswap-proxy-code"],
    "authorization": {k.lower(): v for k, v in echoed.items()}["authorization"],
    "passthrough": passthrough.status_code,
    "passthrough_code": passthrough.headers.get("keyswap-proxy-code"),
}))
sys.exit(5)
"""


def test_an_unmodified_sdk_runs_through_forward_mode(
    forward_only: Gateway, targets: Targets
) -> None:
    before = len(targets.api.arrivals)
    done = forward_only.run(
        sys.executable, "-c", PROGRAM, f"https://127.0.0.2:{targets.passthrough.port}/",
        OPENAI_BASE_URL=f"https://localhost:{targets.api.port}/v1",
        SSL_CERT_FILE=str(targets.ca),
    )  # fmt: skip
    assert done.returncode == 5, done.stderr
    assert json.loads(done.stdout) == {
        "status": 200,
        "code": "proxy-access-granted",
        "authorization": "Bearer ********",  # the real key reached the target, masked back
        "passthrough": 200,  # its own certificate, verified with the machine's CAs
        "passthrough_code": None,  # keyswap never looked into it
    }
    [arrival] = targets.api.arrivals[before:]
    assert arrival.path == "/v1/models"
    assert arrival.headers["authorization"] == f"Bearer {SECRET}"
    assert forward_only.token not in json.dumps(arrival.headers)
    [row] = [r for r in forward_only.rows() if r["proxy_id"] == "agent"]
    assert row["path"] == f"https://localhost:{targets.api.port}/v1/models"


def test_curl_goes_through_it_too(forward_only: Gateway, targets: Targets) -> None:
    script = (
        f'curl -sS https://localhost:{targets.api.port}/v1/curl -H "Authorization: Bearer '
        '$OPENAI_API_KEY" -o /dev/null -w "%{http_code}"'
    )
    done = forward_only.run("bash", "-c", script, SSL_CERT_FILE=str(targets.ca))
    assert (done.returncode, done.stdout) == (0, "200"), done.stderr
    assert targets.api.arrivals[-1].headers["authorization"] == f"Bearer {SECRET}"


def test_workers_serve_both_listeners(targets: Targets) -> None:
    reverse, forward = free_port(), free_port()
    listeners = ("--listen", f"127.0.0.1:{reverse}", "--forward", f"127.0.0.1:{forward}")
    with serve(targets, "workers", *listeners, "--workers", "2") as gateway:
        shown = [str(BIN / "keyswap"), "gateways", "--json"]
        shown += ["--config", str(gateway.config), "--db", str(gateway.db)]
        deadline = time.monotonic() + 30
        while len(live := json.loads(subprocess.check_output(shown, text=True))) < 2:
            assert time.monotonic() < deadline, gateway.process.output()
            time.sleep(0.2)
        both = [
            {"mode": "reverse", "address": f"127.0.0.1:{reverse}"},
            {"mode": "forward", "address": f"127.0.0.1:{forward}"},
        ]
        assert [g["listen"] for g in live] == [both, both]
        url = f"https://localhost:{targets.api.port}/v1/w"
        program = (
            "import httpx, os; key = os.environ['OPENAI_API_KEY']; "
            f"r = httpx.get({url!r}, headers={{'authorization': 'Bearer ' + key}}); "
            "print(r.status_code, r.headers['keyswap-proxy-code'])"
        )
        done = gateway.run(sys.executable, "-c", program, SSL_CERT_FILE=str(targets.ca))
        assert done.stdout.split() == ["200", "proxy-access-granted"], done.stderr
