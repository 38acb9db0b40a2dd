"""End to end: the official OpenAI, Anthropic and Stripe SDKs, unmodified, given a proxy
token as their API key and keyswap's route as their base URL, against a fake API on
loopback. A call works and the target sees only the real key; a stream arrives event by
event; each refusal raises the SDK's own exception class, with keyswap's message."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import anthropic
import httpx
import openai
import pytest
import stripe
from mitmproxy.test import tflow

from keyswap.config.tokens import digest, new_token
from keyswap.gateway import problem
from tests.support.processes import Gateway, free_port, start_gateway

pytestmark = pytest.mark.e2e

SDKS = ("openai", "anthropic", "stripe")
KEYS = {  # the real keys: only the fake API may ever see them
    "openai": "sk-openai-real-0c1d2e",
    "anthropic": "sk-ant-real-7f8e9d",
    "stripe": "sk_test_stripe_real_4a5b6c",
}
HOLD_S = 10  # how long the fake API holds a stream until the client has its first event


@dataclass
class Seen:
    """One request as the fake API received it."""

    method: str
    path: str
    headers: dict[str, str]
    raw: str  # request line, header block and body


@dataclass
class FakeApi:
    """The three APIs' endpoints the tests call, on one loopback server."""

    server: ThreadingHTTPServer
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    held: list[bool] = field(default_factory=list)  # per stream: released by the client?

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def last(self) -> Seen:
        return self.seen[-1]


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return b"data: " + json.dumps({**chunk, "choices": [choice]}).encode() + b"\n\n"


def anthropic_event(kind: str, **data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "m",
    "content": [],
    "stop_reason": None,
    "stop_sequence": None,
    "usage": {"input_tokens": 1, "output_tokens": 1},
}
TEXT = {"type": "text_delta", "text": "Hello"}
OPENAI_STREAM = [
    chat_chunk({"role": "assistant", "content": "Hello"}),
    chat_chunk({"content": " world"}),
    chat_chunk({}, "stop"),
    b"data: [DONE]\n\n",
]
ANTHROPIC_STREAM = [
    anthropic_event("message_start", message=MESSAGE),
    anthropic_event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
    anthropic_event("content_block_delta", index=0, delta=TEXT),
    anthropic_event("content_block_delta", index=0, delta={**TEXT, "text": " world"}),
    anthropic_event("content_block_stop", index=0),
    anthropic_event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 2}),
    anthropic_event("message_stop"),
]
# Which problem reason each status stands for (docs/front-door.md).
REASONS = {
    400: "bad-request",
    401: "wrong-token",
    403: "rule",
    404: "unknown-route",
    405: "method",
    408: "timeout",
    414: "uri-too-long",
    429: "rate-limit",
    431: "header-too-large",
    500: "internal",
    502: "unreachable",
    503: "shutting-down",
    504: "timeout",
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeApi

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        raw = f"{self.requestline}\r\n{self.headers}{body.decode(errors='replace')}"
        self.fake.seen.append(Seen(self.command, self.path, headers, raw))
        path = urlsplit(self.path).path
        stream = bool(body) and json.loads(body).get("stream") is True
        if path.startswith("/problem/"):  # a gateway-made problem response, as made
            status = int(path.split("/")[2])  # the SDK appends its own path
            made = problem.make(tflow.tflow(), status, REASONS[status], f"keyswap says {status}")
            self.send(status, made.content or b"", made.headers["content-type"])
        elif path == "/v1/chat/completions" and stream:
            self.send_events(OPENAI_STREAM, hold_after=0)
        elif path == "/v1/chat/completions":
            message = {"role": "assistant", "content": "hi"}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            completion = {"id": "c1", "object": "chat.completion", "created": 1, "model": "m"}
            self.send_json({**completion, "choices": [choice]})
        elif path == "/v1/messages" and stream:
            self.send_events(ANTHROPIC_STREAM, hold_after=2)
        elif path == "/v1/messages":
            text = {"type": "text", "text": "hi"}
            self.send_json({**MESSAGE, "content": [text], "stop_reason": "end_turn"})
        elif path.startswith("/v1/customers/"):
            self.send_json({"id": path.rsplit("/", 1)[1], "object": "customer"})
        else:
            self.send_json({"error": {"type": "not_found", "message": path}}, 404)

    do_POST = do_DELETE = do_GET

    def send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, value: object, status: int = 200) -> None:
        self.send(status, json.dumps(value).encode(), "application/json")

    def send_events(self, events: list[bytes], hold_after: int) -> None:
        """An event stream, chunked; after event `hold_after` it waits until the client
        says it has that event: a gateway that buffered the stream would never let it."""
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            for i, event in enumerate(events):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                if i == hold_after:
                    self.fake.held.append(self.fake.release.wait(HOLD_S))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True


@pytest.fixture(scope="module")
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


@dataclass
class World:
    gateway: Gateway
    fake: FakeApi
    tokens: dict[str, str]  # proxy id -> its token

    def base(self, proxy: str) -> str:
        return f"{self.gateway.url}/api/{proxy}"


def config_text(fake: FakeApi, tokens: dict[str, str]) -> str:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    credentials = {
        "openai": '{ type: bearer, token: "${env:SDK_OPENAI}" }',
        "anthropic": '{ type: header, name: x-api-key, value: "${env:SDK_ANTHROPIC}" }',
        "stripe": '{ type: bearer, token: "${env:SDK_STRIPE}" }',
    }
    bases = {"openai": "/v1", "anthropic": "", "stripe": ""}
    denied = {"openai": "/models/**", "anthropic": "/v1/models/**", "stripe": "/v1/charges/**"}
    lines = ["version: 1", "credentials:"]
    lines += [f"  {sdk}: {credentials[sdk]}" for sdk in SDKS]
    lines += ["targets:"]
    for sdk in SDKS:
        lines.append(f'  {sdk}: {{ base_url: "{fake.url}{bases[sdk]}", credential: {sdk} }}')
        lines.append(f'  {sdk}-dead: {{ base_url: "{dead}{bases[sdk]}", credential: {sdk} }}')
    lines += ["proxies:"]

    def tokens_of(pid: str) -> str:
        return f"tokens: [{{ id: app, sha256: {digest(tokens[pid])} }}]"

    for sdk in SDKS:
        lines.append(f"  {sdk}:")
        lines.append(f"    target: {sdk}")
        lines.append(f"    rules: [{{ deny: {{ path: {denied[sdk]} }} }}]")
        lines.append(f"    {tokens_of(sdk)}")
        lines.append(
            f"  {sdk}-limited: {{ target: {sdk}, rate_limit: 1/h, {tokens_of(sdk + '-limited')} }}"
        )
        lines.append(f"  {sdk}-dead: {{ target: {sdk}-dead, {tokens_of(sdk + '-dead')} }}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, fake: FakeApi) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("sdks")
    proxies = [f"{sdk}{kind}" for sdk in SDKS for kind in ("", "-limited", "-dead")]
    tokens = {pid: new_token() for pid in proxies}
    config = tmp / "keyswap.yaml"
    config.write_text(config_text(fake, tokens))
    env = {f"SDK_{sdk.upper()}": KEYS[sdk] for sdk in SDKS}
    db = tmp / "keyswap.db"
    gateway = start_gateway(config, tmp, env=env, db=db)
    try:
        yield World(gateway, fake, tokens)
    finally:
        gateway.stop()
    # Wherever the SDKs put the token, it reached neither the target nor the log.
    received = "".join(s.raw for s in fake.seen)
    stored = b"".join(f.read_bytes() for f in tmp.glob("keyswap.db*"))
    output = gateway.output()
    assert "Traceback" not in output, output
    for token in tokens.values():
        assert token not in received, "a proxy token reached the target"
        assert token.encode() not in stored, "a proxy token reached the activity log"
        assert token not in output, "a proxy token reached the gateway's output"
    for key in KEYS.values():
        assert key.encode() not in stored and key not in output, "a real key was recorded"
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("select count(*) from requests").fetchone()[0]
    assert rows > 0, "the activity log is empty: the checks above saw nothing"


@pytest.fixture(autouse=True)
def no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDKs read keys, base URLs and proxies from the environment: none here."""
    for name in ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)


def openai_client(world: World, proxy: str, token: str | None = None) -> openai.OpenAI:
    key = token or world.tokens[proxy]
    return openai.OpenAI(api_key=key, base_url=world.base(proxy), max_retries=0, timeout=30)


def anthropic_client(world: World, proxy: str, token: str | None = None) -> anthropic.Anthropic:
    key = token or world.tokens[proxy]
    return anthropic.Anthropic(api_key=key, base_url=world.base(proxy), max_retries=0, timeout=30)


def stripe_client(world: World, proxy: str, token: str | None = None) -> stripe.StripeClient:
    return stripe.StripeClient(
        token or world.tokens[proxy],
        base_addresses={"api": world.base(proxy)},
        max_network_retries=0,
    )


def chat(world: World, proxy: str, token: str | None = None) -> object:
    client = openai_client(world, proxy, token)
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])


def message(world: World, proxy: str, token: str | None = None) -> object:
    client = anthropic_client(world, proxy, token)
    return client.messages.create(
        model="m", max_tokens=8, messages=[{"role": "user", "content": "x"}]
    )


def customer(world: World, proxy: str, token: str | None = None) -> object:
    return stripe_client(world, proxy, token).v1.customers.retrieve("cus_1")


# --- a call works, and the target sees only the real key ---------------------------


def test_openai(world: World) -> None:
    completion = openai_client(world, "openai").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}]
    )
    assert completion.choices[0].message.content == "hi"
    seen = world.fake.last()
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.headers["authorization"] == f"Bearer {KEYS['openai']}"
    assert world.tokens["openai"] not in seen.raw


def test_anthropic(world: World) -> None:
    reply = anthropic_client(world, "anthropic").messages.create(
        model="m", max_tokens=8, messages=[{"role": "user", "content": "x"}]
    )
    assert reply.content[0].type == "text" and reply.content[0].text == "hi"
    seen = world.fake.last()
    assert (seen.method, seen.path) == ("POST", "/v1/messages")
    assert seen.headers["x-api-key"] == KEYS["anthropic"]  # the token came in x-api-key
    assert "authorization" not in seen.headers
    assert world.tokens["anthropic"] not in seen.raw


def test_stripe(world: World) -> None:
    found = stripe_client(world, "stripe").v1.customers.retrieve("cus_42")
    assert found.id == "cus_42"
    seen = world.fake.last()
    assert (seen.method, seen.path) == ("GET", "/v1/customers/cus_42")
    assert seen.headers["authorization"] == f"Bearer {KEYS['stripe']}"
    assert world.tokens["stripe"] not in seen.raw


def test_basic_with_the_token_as_user_name(world: World) -> None:
    """What Stripe's docs show (`curl -u sk_...:`): the key as Basic's user name."""
    url = f"{world.base('stripe')}/v1/customers/cus_7"
    r = httpx.get(url, auth=(world.tokens["stripe"], ""), timeout=30)
    assert r.status_code == 200, r.text
    assert world.fake.last().headers["authorization"] == f"Bearer {KEYS['stripe']}"


# --- streams arrive event by event --------------------------------------------------


def test_openai_stream_event_by_event(world: World) -> None:
    world.fake.release.clear()
    client = openai_client(world, "openai")
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], stream=True
    )
    texts = []
    for chunk in stream:
        texts.append(chunk.choices[0].delta.content)
        world.fake.release.set()  # the target sends the rest only now
    assert texts == ["Hello", " world", None]
    assert world.fake.held[-1] is True, "the first event arrived only with the rest"
    assert world.tokens["openai"] not in world.fake.last().raw


def test_anthropic_stream_event_by_event(world: World) -> None:
    world.fake.release.clear()
    client = anthropic_client(world, "anthropic")
    with client.messages.stream(
        model="m", max_tokens=8, messages=[{"role": "user", "content": "x"}]
    ) as stream:
        texts = []
        for text in stream.text_stream:
            texts.append(text)
            world.fake.release.set()
        final = stream.get_final_message()
    assert texts == ["Hello", " world"]
    assert final.stop_reason == "end_turn"
    assert world.fake.held[-1] is True, "the first event arrived only with the rest"
    assert world.fake.last().headers["x-api-key"] == KEYS["anthropic"]


# --- refusals raise the SDK's own exception, with keyswap's message -----------------

REFUSALS = {  # case -> (status, keyswap's message)
    "wrong-token": (401, "the token is not valid for this proxy"),
    "rule": (403, "a rule of this proxy denies the request"),
    "unknown-route": (404, "no proxy is configured for this path"),
    "rate-limit": (429, "rate limit 1/h exceeded"),
    "unreachable": (502, "target '{sdk}-dead' failed: connection refused"),
}
EXCEPTIONS: dict[str, dict[int, type[Exception]]] = {
    "openai": {
        400: openai.BadRequestError,
        401: openai.AuthenticationError,
        403: openai.PermissionDeniedError,
        404: openai.NotFoundError,
        405: openai.APIStatusError,
        408: openai.APIStatusError,
        414: openai.APIStatusError,
        429: openai.RateLimitError,
        431: openai.APIStatusError,
        500: openai.InternalServerError,
        502: openai.InternalServerError,
        503: openai.InternalServerError,
        504: openai.InternalServerError,
    },
    "anthropic": {
        400: anthropic.BadRequestError,
        401: anthropic.AuthenticationError,
        403: anthropic.PermissionDeniedError,
        404: anthropic.NotFoundError,
        405: anthropic.APIStatusError,
        408: anthropic.RequestTimeoutError,
        414: anthropic.APIStatusError,
        429: anthropic.RateLimitError,
        431: anthropic.RequestHeaderFieldsTooLargeError,
        500: anthropic.InternalServerError,
        502: anthropic.InternalServerError,
        503: anthropic.ServiceUnavailableError,
        504: anthropic.GatewayTimeoutError,
    },
    "stripe": {
        400: stripe.InvalidRequestError,
        401: stripe.AuthenticationError,
        403: stripe.PermissionError,
        404: stripe.InvalidRequestError,
        405: stripe.APIError,  # stripe-python maps only 400 and 404 to InvalidRequestError
        408: stripe.APIError,
        414: stripe.APIError,
        429: stripe.RateLimitError,
        431: stripe.APIError,
        500: stripe.APIError,
        502: stripe.APIError,
        503: stripe.APIError,
        504: stripe.APIError,
    },
}
# Where each SDK keeps the API's own message (`error.message` of the body).
MESSAGE_OF: dict[str, Callable[[Any], object]] = {
    "openai": lambda e: e.body["message"],
    "anthropic": lambda e: e.api_message,
    "stripe": lambda e: e.user_message,
}
CALLS: dict[str, Callable[[World, str, str | None], object]] = {
    "openai": chat,
    "anthropic": message,
    "stripe": customer,
}


def refused_call(world: World, sdk: str, case: str) -> Callable[[], object]:
    """The SDK call that keyswap refuses for `case`."""
    call = CALLS[sdk]
    if case == "wrong-token":
        return lambda: call(world, sdk, new_token())
    if case == "unknown-route":
        return lambda: call(world, "nowhere", world.tokens[sdk])
    if case == "rate-limit":
        call(world, f"{sdk}-limited", None)  # the one request an hour the proxy allows
        return lambda: call(world, f"{sdk}-limited", None)
    if case == "unreachable":
        return lambda: call(world, f"{sdk}-dead", None)
    denied = {  # a path a deny rule of the proxy matches
        "openai": lambda: openai_client(world, sdk).models.retrieve("m"),
        "anthropic": lambda: anthropic_client(world, sdk).models.retrieve("m"),
        "stripe": lambda: stripe_client(world, sdk).v1.charges.retrieve("ch_1"),
    }
    return denied[sdk]


@pytest.mark.parametrize("case", list(REFUSALS))
@pytest.mark.parametrize("sdk", SDKS)
def test_refusals_raise_the_sdks_exception(world: World, sdk: str, case: str) -> None:
    status, message_text = REFUSALS[case]
    keyswap_message = message_text.format(sdk=sdk)
    call = refused_call(world, sdk, case)
    before = len(world.fake.seen)
    with pytest.raises(Exception) as raised:
        call()
    error = raised.value
    assert type(error) is EXCEPTIONS[sdk][status], repr(error)
    assert keyswap_message in str(error)
    assert MESSAGE_OF[sdk](error) == keyswap_message
    assert len(world.fake.seen) == before, "a refused request reached the target"


@pytest.mark.parametrize("status", sorted(REASONS))
@pytest.mark.parametrize("sdk", SDKS)
def test_every_problem_status_raises_the_documented_exception(
    fake: FakeApi, sdk: str, status: int
) -> None:
    """The table in docs/front-door.md: each status keyswap answers with, as each SDK
    reads the problem body (served as made, without a gateway in between)."""
    base = f"{fake.url}/problem/{status}"
    calls: dict[str, Callable[[], object]] = {
        "openai": lambda: openai.OpenAI(api_key="k", base_url=base, max_retries=0).models.list(),
        "anthropic": lambda: anthropic.Anthropic(
            api_key="k", base_url=base, max_retries=0
        ).models.list(),
        "stripe": lambda: stripe.StripeClient(
            "k", base_addresses={"api": base}, max_network_retries=0
        ).v1.customers.list(),
    }
    with pytest.raises(Exception) as raised:
        calls[sdk]()
    assert type(raised.value) is EXCEPTIONS[sdk][status], repr(raised.value)
    assert f"keyswap says {status}" in str(raised.value)
    assert MESSAGE_OF[sdk](raised.value) == f"keyswap says {status}"
