import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from keyswap.cli.main import main
from tests.support import ROOT
from tests.support.processes import free_port


def test_upstreams_list_resolves_params_per_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config = str(ROOT / "config" / "keyswap.yaml")
    dev = CliRunner().invoke(main, ["upstreams", "list", "--config", config])
    assert dev.exit_code == 0, dev.output
    assert "corporate  http  127.0.0.1:3128  basic  hubspot" in dev.output
    monkeypatch.setenv("KEYSWAP_ENV", "prod")
    prod = CliRunner().invoke(main, ["upstreams", "list", "--config", config, "--json"])
    assert json.loads(prod.output)[0]["address"] == "proxy.corp.example.com:8443"
    assert json.loads(prod.output)[0]["auth"] == "basic" and "password" not in prod.output


def test_test_upstream_needs_a_known_proxy() -> None:
    config = str(ROOT / "config" / "keyswap.yaml")
    result = CliRunner().invoke(main, ["test-upstream", "nope", "--config", config])
    assert result.exit_code == 1 and "no upstream proxy 'nope' (known: corporate)" in result.output


class ForwardProxy(BaseHTTPRequestHandler):
    """A forward proxy that answers every absolute-form request itself."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(204)
        self.send_header("connection", "close")
        self.end_headers()


def test_test_upstream_json_has_every_step(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ForwardProxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    dead = free_port()
    config = tmp_path / "keyswap.yaml"
    config.write_text(
        f"""\
version: 1
upstream_proxies:
  live: {{ host: 127.0.0.1, port: {server.server_address[1]}, auth: {{ type: none }} }}
  dead: {{ host: 127.0.0.1, port: {dead}, auth: {{ type: basic, user: svc, password: pw }} }}
"""
    )
    try:
        ok = CliRunner().invoke(
            main,
            [
                "test-upstream",
                "live",
                "--url",
                "http://api.example/",
                "--json",
                "--config",
                str(config),
            ],
        )
        assert ok.exit_code == 0, ok.output
        doc = json.loads(ok.stdout)
        assert doc["ok"] is True and doc["user"] is None and doc["url"] == "http://api.example/"
        assert [s["step"] for s in doc["steps"]] == [
            "TCP to the proxy",
            "proxy accepts",
            "response from the far side",
        ]
        failed = CliRunner().invoke(
            main,
            [
                "test-upstream",
                "dead",
                "--url",
                "http://api.example/",
                "--json",
                "--config",
                str(config),
            ],
        )
        assert failed.exit_code == 1  # the result is printed, then the failure
        doc = json.loads(failed.stdout)
        assert doc["ok"] is False and doc["user"] == "svc" and "pw" not in failed.stdout
        assert [(s["step"], s["ok"]) for s in doc["steps"]] == [("TCP to the proxy", False)]
        assert "'dead' failed at: TCP to the proxy" in failed.stderr
    finally:
        server.shutdown()
        server.server_close()
