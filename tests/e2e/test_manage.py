"""End to end: managing proxies while a gateway serves the same config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from keyswap.config.tokens import digest, new_token
from tests.support.processes import BIN, start_echo_target, start_gateway

pytestmark = pytest.mark.e2e

TOKEN = re.compile(r"\(shown once, store it now\): (ks_[A-Za-z0-9_-]{43})")


def keyswap(config: Path, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ECHO_SECRET": "manage-secret",
        "KEYSWAP_DB": str(config.parent / "keyswap.db"),
    }
    if token:
        env["KEYSWAP_TOKEN"] = token
    return subprocess.run(
        [str(BIN / "keyswap"), *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_lifecycle_against_a_running_gateway(tmp_path: Path) -> None:
    echo = start_echo_target(tmp_path)
    token = new_token()
    config = tmp_path / "keyswap.yaml"
    config.write_text(
        f"""\
version: 1
credentials:
  k: {{ type: bearer, token: "${{env:ECHO_SECRET}}" }}
targets:
  echo: {{ base_url: "http://127.0.0.1:{echo.port}", credential: k }}
proxies:
  app:   # the proxy under test
    target: echo
    tokens: [{{ id: web, sha256: {digest(token)} }}]
"""
    )
    gateway = start_gateway(
        config, tmp_path, db=tmp_path / "keyswap.db", env={"ECHO_SECRET": "manage-secret"}
    )
    url = f"{gateway.url}/api/app/x"

    def status(t: str) -> int:
        return httpx.get(url, headers={"x-proxy-token": t}).status_code

    try:
        time.sleep(0.5)  # the gateway announces itself in the database
        assert status(token) == 200

        rotated = keyswap(config, "proxies", "rotate-token", "app", "--token-id", "web")
        assert rotated.returncode == 0, rotated.stderr
        assert "serves the change" in rotated.stdout  # it waited for the gateway
        new = TOKEN.search(rotated.stdout).group(1)  # type: ignore[union-attr]
        assert status(token) == 401 and status(new) == 200

        tested = keyswap(config, "test", "app", "--path", "/hello", token=new)
        assert tested.returncode == 0 and "code     proxy-access-granted" in tested.stdout
        denied = keyswap(config, "test", "app", token=token)
        assert denied.returncode == 1 and "proxy-access-denied" in denied.stdout

        for lang, runner in (("python", [sys.executable, "-"]), ("curl", ["sh", "-s"])):
            snippet = keyswap(
                config, "code", "app", "--lang", lang, "--url", gateway.url, "--path", "/snippet"
            ).stdout
            ran = subprocess.run(
                runner,
                input=snippet,
                capture_output=True,
                text=True,
                timeout=30,
                env={**os.environ, "KEYSWAP_TOKEN": new},
                check=True,
            )
            assert '"path": "/snippet"' in ran.stdout, (lang, ran.stdout, ran.stderr)

        assert keyswap(config, "proxies", "disable", "app").returncode == 0
        r = httpx.get(url, headers={"x-proxy-token": new})
        assert r.status_code == 403 and r.headers["keyswap-proxy-code"] == "proxy-access-denied"
        assert keyswap(config, "proxies", "enable", "app").returncode == 0
        assert status(new) == 200
        assert keyswap(config, "proxies", "delete", "app", "--yes").returncode == 0
        assert status(new) == 404
        assert "# the proxy under test" not in config.read_text()  # went with the proxy
        assert "ECHO_SECRET" in config.read_text()
    finally:
        gateway.stop()
        echo.stop()
    audit = keyswap(config, "audit").stdout
    for action in ("rotate-token", "disable", "enable", "delete"):
        assert action in audit
