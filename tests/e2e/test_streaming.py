"""End to end: bodies stream through the gateway in constant memory; SSE event by event."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from keyswap.config.tokens import digest, new_token
from tests.support.processes import (
    BIN,
    GATEWAY_SCRIPT,
    Gateway,
    Process,
    free_port,
    start_echo_target,
    start_gateway,
)

pytestmark = pytest.mark.e2e

GIB = 1024**3
RSS_BUDGET_KIB = 100 * 1024


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Process, str]]:
    tmp = tmp_path_factory.mktemp("streaming")
    echo = start_echo_target(tmp)
    token = new_token()
    config = tmp / "keyswap.yaml"
    config.write_text(
        f"""\
version: 1
credentials:
  k: {{ type: bearer, token: "${{env:HOME}}" }}
targets:
  echo: {{ base_url: "http://127.0.0.1:{echo.port}", credential: k, timeout_s: 120 }}
proxies:
  s: {{ target: echo, tokens: [{{ id: t, sha256: {digest(token)} }}] }}
"""
    )
    gateway = start_gateway(config, tmp, plain_mitmdump=True, extra=["-q"])
    yield gateway, echo, token
    gateway.stop()
    echo.stop()


def test_plain_mitmdump_serves(setup: tuple[Gateway, Process, str]) -> None:
    gateway, _, token = setup
    r = httpx.get(f"{gateway.url}/api/s/x", headers={"x-proxy-token": token})
    assert r.status_code == 200 and r.headers["keyswap-proxy-code"] == "proxy-access-granted"


def test_one_gib_download_in_constant_memory(setup: tuple[Gateway, Process, str]) -> None:
    gateway, _, token = setup
    before = gateway.rss_kib()
    total = 0
    with httpx.stream(
        "GET", f"{gateway.url}/api/s/bytes/{GIB}", headers={"x-proxy-token": token}, timeout=120
    ) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw(1024 * 1024):
            total += len(chunk)
    assert total == GIB
    assert gateway.peak_rss_kib() - before < RSS_BUDGET_KIB


def test_one_gib_upload_in_constant_memory(setup: tuple[Gateway, Process, str]) -> None:
    gateway, _, token = setup
    before = gateway.rss_kib()
    block = b"y" * (1024 * 1024)

    def body() -> Iterator[bytes]:
        for _ in range(1024):
            yield block

    r = httpx.post(
        f"{gateway.url}/api/s/count",
        headers={"x-proxy-token": token, "content-length": str(GIB)},
        content=body(),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["bytes"] == GIB
    assert gateway.peak_rss_kib() - before < RSS_BUDGET_KIB


def test_sse_events_arrive_before_the_stream_ends(setup: tuple[Gateway, Process, str]) -> None:
    gateway, _, token = setup
    started = time.monotonic()
    arrivals = []
    with httpx.stream(
        "GET",
        f"{gateway.url}/api/s/sse?events=3&gap=1",
        headers={"x-proxy-token": token},
        timeout=30,
    ) as r:
        assert r.headers["content-type"] == "text/event-stream"
        for line in r.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 3
    # One event a second: streamed, they arrive about 2 s apart; buffered, all at once.
    assert arrivals[-1] - arrivals[0] > 1.5, f"events were held back: {arrivals}"


def test_chunked_upload_streams(setup: tuple[Gateway, Process, str]) -> None:
    gateway, _, token = setup

    def body() -> Iterator[bytes]:
        for _ in range(100):
            yield b"z" * 10_000

    r = httpx.post(
        f"{gateway.url}/api/s/count", headers={"x-proxy-token": token}, content=body(), timeout=30
    )
    assert r.json()["bytes"] == 1_000_000


def test_denied_upload_is_refused_cleanly(setup: tuple[Gateway, Process, str]) -> None:
    gateway, _, _ = setup
    r = httpx.post(
        f"{gateway.url}/api/s/count", headers={"x-proxy-token": "ks_wrong"}, content=b"x" * 200_000
    )
    assert r.status_code == 401 and r.headers["keyswap-proxy-code"] == "proxy-access-denied"


@pytest.mark.parametrize("plain", [True, False], ids=["mitmdump", "keyswap-serve"])
def test_an_invalid_config_stops_the_gateway(tmp_path: Path, plain: bool) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nproxies:\n  p: { target: nowhere }\n")
    port = free_port()
    if plain:
        cmd = [str(BIN / "mitmdump"), "-s", str(GATEWAY_SCRIPT)]
        cmd += ["--mode", f"reverse:http://unused.invalid@{port}", "--set", f"keyswap_config={bad}"]
    else:
        cmd = [str(BIN / "keyswap"), "serve", "--config", str(bad), "--listen", f"127.0.0.1:{port}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "proxies.p.target: target 'nowhere' is not defined" in done.stdout + done.stderr
