"""End to end: a running gateway picks up config changes within 2 s, and keeps serving
the previous config when a change is invalid."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from keyswap.config.tokens import digest, new_token
from tests.support.processes import BIN, start_echo_target, start_gateway

pytestmark = pytest.mark.e2e


def config(port: int, *tokens: str) -> str:
    listed = ", ".join(f"{{ id: t{i}, sha256: {digest(t)} }}" for i, t in enumerate(tokens))
    return f"""\
version: 1
credentials:
  k: {{ type: bearer, token: "${{env:HOME}}" }}
targets:
  echo: {{ base_url: "http://127.0.0.1:{port}", credential: k }}
proxies:
  p: {{ target: echo, tokens: [{listed}] }}
"""


def replace(path: Path, text: str) -> None:
    """Write the way an editor or `keyswap` does: a new file renamed over the old."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def within(seconds: float, check: Callable[[], bool]) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds}s")


def test_rotation_and_broken_files(tmp_path: Path) -> None:
    echo = start_echo_target(tmp_path)
    old, new = new_token(), new_token()
    path = tmp_path / "keyswap.yaml"
    path.write_text(config(echo.port, old))
    gateway = start_gateway(path, tmp_path)
    url = f"{gateway.url}/api/p/x"

    def status(token: str) -> int:
        return httpx.get(url, headers={"x-proxy-token": token}).status_code

    try:
        assert status(old) == 200 and status(new) == 401
        replace(path, config(echo.port, new))
        within(2.0, lambda: status(new) == 200)
        assert status(old) == 401

        replace(path, config(echo.port, new) + "  broken: [\n")
        time.sleep(1.5)
        assert status(new) == 200  # the previous config still serves
        assert "reload failed, still serving the previous config" in gateway.output()
        assert "YAML syntax error" in gateway.output()

        replace(path, config(echo.port, old, new))
        within(2.0, lambda: status(old) == 200)
        assert status(new) == 200
    finally:
        gateway.stop()
        echo.stop()
    db = tmp_path / f"keyswap-{gateway.port}.db"
    audit = subprocess.run(
        [str(BIN / "keyswap"), "audit", "--db", str(db), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    actions = [row["action"] for row in json.loads(audit)]  # --json: one array
    assert actions == ["reload", "reload-failed", "reload"]
    assert "YAML syntax error" in audit
