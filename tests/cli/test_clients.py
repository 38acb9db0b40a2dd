"""`keyswap code`, `test` and `export`: the snippets call a path the proxy allows, and they
work: each printed program is run against a real gateway in front of a fake API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from keyswap.cli import snippets
from keyswap.cli.main import main
from keyswap.config.model import Proxy
from keyswap.config.templates import TEMPLATES
from keyswap.config.tokens import digest, new_token
from tests.support.processes import start_gateway

KEYS = {"openai": "sk-openai-real-1a2b", "anthropic": "sk-ant-real-3c4d", "stripe": "sk_test_5e6f"}


def code(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["code", *args, "--config", str(config)])


def template_proxy(name: str) -> Proxy:
    """A proxy as `keyswap proxies create --template NAME` makes it."""
    t = TEMPLATES[name]
    return Proxy.model_validate(
        {"target": "t", "template": name, "methods": t.methods, "rules": t.rules}
    )


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_gets_a_call_its_rules_allow(name: str) -> None:
    proxy = template_proxy(name)
    call, sdk = snippets.choose(proxy, None, None)
    assert snippets.allows(proxy, call.method, call.path)
    assert (sdk is not None) == (name in snippets.SDKS)
    for lang in snippets.LANGS:
        text = snippets.snippet(lang, "https://gw.example.com/api/p", call, sdk)
        assert "KEYSWAP_TOKEN" in text and "ks_" not in text


def test_allows_is_the_policy_stage_s_decision() -> None:
    proxy = Proxy.model_validate(
        {
            "target": "t",
            "methods": ["GET", "POST"],
            "rules": [{"deny": {"path": "/admin/**"}}, {"allow": {"path": "/v1/*/items"}}],
        }
    )
    assert snippets.allows(proxy, "GET", "/v1/a/items")
    assert not snippets.allows(proxy, "GET", "/ADMIN;x=1/users")  # as the gateway reads it
    assert not snippets.allows(proxy, "DELETE", "/v1/a/items")  # not in methods
    assert not snippets.allows(Proxy.model_validate({"target": "t"}), "TRACE", "/")


def test_a_post_only_proxy_gets_its_one_allowed_request(tmp_path: Path) -> None:
    config = tmp_path / "keyswap.yaml"
    config.write_text((Path(__file__).parents[2] / "config" / "keyswap.yaml").read_text())
    result = code(config, "agent-llm", "--lang", "curl", "--url", "http://gw")
    assert result.output == (
        'curl -sS -X POST "http://gw/api/llm/v1/messages" -H "Authorization: Bearer ${KEYSWAP_TOKEN}"\n'
    )
    asked = code(config, "agent-llm", "--lang", "python", "--path", "/v1/models", "--json")
    doc = json.loads(asked.stdout)
    assert (doc["method"], doc["path"], doc["allowed"], doc["sdk"]) == (
        "POST",
        "/v1/models",
        False,
        None,
    )
    assert "warning: proxy 'agent-llm' refuses POST /v1/models" in asked.stderr


# --- the snippets, run -----------------------------------------------------------------


@dataclass
class FakeApi:
    """OpenAI's, Anthropic's and Stripe's endpoints that the snippets call."""

    server: ThreadingHTTPServer
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


MODELS = {  # one list both SDKs read
    "object": "list",
    "data": [
        {
            "id": "model-a",
            "object": "model",
            "type": "model",
            "created": 0,
            "owned_by": "fake",
            "display_name": "Model A",
            "created_at": "2025-01-01T00:00:00Z",
        }
    ],
    "has_more": False,
    "first_id": "model-a",
    "last_id": "model-a",
}
ANSWERS = {
    ("GET", "/v1/models"): MODELS,
    ("POST", "/v1/messages"): {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [{"type": "text", "text": "hello from the fake"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 1},
    },
    ("GET", "/v1/customers"): {
        "object": "list",
        "data": [{"id": "cus_fake1", "object": "customer"}],
        "has_more": False,
        "url": "/v1/customers",
    },
    ("POST", "/items"): {"created": True},
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeApi

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        path = self.path.split("?")[0]
        self.fake.seen.append((self.command, path, {k.lower(): v for k, v in self.headers.items()}))
        answer = ANSWERS.get((self.command, path))
        body = json.dumps(answer or {"error": {"message": f"no {path}"}}).encode()
        self.send_response(200 if answer else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET


@pytest.fixture
def fake() -> Iterator[FakeApi]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    api = FakeApi(server)
    Handler.fake = api
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield api
    server.shutdown()
    server.server_close()


PROXIES = {  # id: (target, template, methods, rules)
    "llm": ("openai", "openai", ["GET", "POST", "DELETE"], []),
    "claude": (
        "anthropic",
        "anthropic",
        ["GET", "POST"],
        ["{allow: {path: /v1/**}}", "{deny: {}}"],
    ),
    "claude-post": (
        "anthropic",
        "anthropic",
        ["POST"],
        ["{allow: {path: /v1/messages}}", "{deny: {}}"],
    ),
    "billing": ("stripe", "stripe", ["GET", "POST"], ["{allow: {path: /v1/**}}", "{deny: {}}"]),
    "items": ("stripe", None, ["POST"], ["{allow: {path: /items/**}}", "{deny: {}}"]),
}


def write_config(tmp: Path, port: int, tokens: dict[str, str]) -> Path:
    lines = [
        "version: 1",
        "credentials:",
        f"  openai: {{type: bearer, token: {KEYS['openai']}}}",
        f"  anthropic: {{type: header, name: x-api-key, value: {KEYS['anthropic']}}}",
        f"  stripe: {{type: bearer, token: {KEYS['stripe']}}}",
        "targets:",
        f"  openai: {{base_url: 'http://127.0.0.1:{port}/v1', credential: openai}}",
        f"  anthropic: {{base_url: 'http://127.0.0.1:{port}', credential: anthropic}}",
        f"  stripe: {{base_url: 'http://127.0.0.1:{port}', credential: stripe}}",
        "proxies:",
    ]
    for pid, (target, template, methods, rules) in PROXIES.items():
        lines += [f"  {pid}:", f"    target: {target}", f"    methods: [{', '.join(methods)}]"]
        lines += [f"    template: {template}"] if template else []
        lines += [f"    rules: [{', '.join(rules)}]"] if rules else []
        lines += [f"    tokens: [{{id: t, sha256: {digest(tokens[pid])}}}]"]
    path = tmp / "keyswap.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


# proxy, language: what the program prints, and the request the fake API gets
RUNS = {
    ("llm", "python"): ("['model-a']", ("GET", "/v1/models")),
    ("llm", "curl"): ('"model-a"', ("GET", "/v1/models")),
    ("claude", "python"): ("['model-a']", ("GET", "/v1/models")),
    ("claude", "curl"): ('"model-a"', ("GET", "/v1/models")),
    ("claude-post", "python"): ("hello from the fake", ("POST", "/v1/messages")),
    ("billing", "python"): ("['cus_fake1']", ("GET", "/v1/customers")),
    ("billing", "javascript"): ("200 proxy-access-granted", ("GET", "/v1/customers")),
    ("billing", "curl"): ('"cus_fake1"', ("GET", "/v1/customers")),
    ("items", "python"): ("200 proxy-access-granted", ("POST", "/items")),
    ("items", "javascript"): ("200 proxy-access-granted", ("POST", "/items")),
}
RUNNERS = {"python": [sys.executable], "curl": ["bash"], "javascript": ["node"]}
SUFFIX = {"python": ".py", "curl": ".sh", "javascript": ".mjs"}


@pytest.mark.e2e
def test_the_printed_snippets_run_through_the_gateway(tmp_path: Path, fake: FakeApi) -> None:
    tokens = {pid: new_token() for pid in PROXIES}
    config = write_config(tmp_path, fake.port, tokens)
    gateway = start_gateway(config, tmp_path)
    try:
        for (pid, lang), (printed, request) in RUNS.items():
            result = code(config, pid, "--lang", lang, "--url", gateway.url)
            assert result.exit_code == 0 and not result.stderr, result.output
            program = tmp_path / f"{pid}-{lang}{SUFFIX[lang]}"
            program.write_text(result.stdout)
            env = {**os.environ, "KEYSWAP_TOKEN": tokens[pid]}
            ran = subprocess.run(
                [*RUNNERS[lang], str(program)],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )
            where = f"{pid} {lang}:\n{result.stdout}\n{ran.stdout}{ran.stderr}"
            assert ran.returncode == 0 and printed in ran.stdout, where
            method, path, headers = fake.seen[-1]
            assert (method, path) == request, where
            target = PROXIES[pid][0]
            sent = headers.get("x-api-key") or headers.get("authorization", "")
            assert KEYS[target] in sent and tokens[pid] not in json.dumps(headers)
        # `keyswap test --json`: one document, granted or not (then exit 1)
        for path, status, exit_code in (("/v1/customers", 200, 0), ("/admin", 403, 1)):
            args = ["test", "billing", "--path", path, "--url", gateway.url, "--json"]
            env = {"KEYSWAP_TOKEN": tokens["billing"]}
            tested = CliRunner().invoke(main, [*args, "--config", str(config)], env=env)
            doc = json.loads(tested.stdout)
            assert (tested.exit_code, doc["status"]) == (exit_code, status), tested.output
            assert doc["headers"]["keyswap-request-id"] == doc["request_id"]
    finally:
        gateway.stop()


@pytest.mark.parametrize("pid", ["llm", "claude", "claude-post"])
def test_the_sdk_javascript_snippets_parse(tmp_path: Path, pid: str) -> None:
    """Their SDKs are not installed here: node checks the module's syntax."""
    tokens = {p: new_token() for p in PROXIES}
    config = write_config(tmp_path, 1, tokens)
    result = code(config, pid, "--lang", "javascript")
    assert "new " in result.stdout and "process.env.KEYSWAP_TOKEN" in result.stdout
    program = tmp_path / "snippet.mjs"
    program.write_text(result.stdout)
    checked = subprocess.run(["node", "--check", str(program)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_code_json(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1, {p: new_token() for p in PROXIES})
    doc = json.loads(code(config, "billing", "--lang", "python", "--json").stdout)
    assert doc["sdk"] == "stripe" and doc["url"] == "http://127.0.0.1:8080/api/billing/v1/customers"
    assert doc["allowed"] is True and "StripeClient(" in doc["snippet"]
    js = json.loads(code(config, "billing", "--lang", "javascript", "--json").stdout)
    assert js["sdk"] is None and "fetch(" in js["snippet"]
