"""One delivery attempt of a stored async request, through the whole pipeline.

The stored request is handed to mitmproxy's proxy core the way its client replay does
(a connection handler whose "client" is a mock that has just sent the request), so every
stage sees it as it sees a client's request: routing, the proxy's rules, the rewrite,
the header filter, the credential swap, the upstream proxy, TLS, OAuth2, timeouts and
the activity log row. What differs is decided here, by identity: a flow is an attempt
only while this module holds it (`attempt_of`), so no stored or replayed flow, whatever
its metadata says, can pass for one and skip authentication."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from mitmproxy import connection, http
from mitmproxy.addons.clientplayback import ReplayHandler
from mitmproxy.options import Options
from mitmproxy.proxy.mode_specs import ProxyMode

from keyswap.gateway import problem
from keyswap.state.async_queue import Job

# The address the mock client "sent" the request to: never connected to (the rewrite
# gives every granted request its target, and a refused one goes nowhere).
NOWHERE = ("async.keyswap.invalid", 80)
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Attempts are flows of a reverse-mode client: the activity log's `mode` is `reverse`.
_MODE = ProxyMode.parse("reverse:http://async.keyswap.invalid")


class Attempt:
    """A delivery attempt in flight: its job, its flow and what it keeps of a streamed
    response body (at most `keep` bytes; the whole size is counted)."""

    def __init__(self, job: Job, flow: http.HTTPFlow, keep: int) -> None:
        self.job = job
        self.flow = flow
        self.keep = keep
        self.kept = bytearray()
        self.streamed: int | None = None  # the streamed body's size, when it streamed
        self.cut = False  # the attempt's time limit ended it

    def capture(self, chunk: bytes) -> bytes:
        """A response stream callable: keeps the first `keep` bytes, counts them all."""
        self.streamed = (self.streamed or 0) + len(chunk)
        self.flow.metadata[problem.BYTES_OUT] = self.streamed
        if len(self.kept) < self.keep:
            self.kept += chunk[: self.keep - len(self.kept)]
        return chunk


_attempts: dict[str, Attempt] = {}  # by flow id, while in flight
_handlers: dict[str, ReplayHandler] = {}  # by the mock client's connection id


def attempt_of(flow: http.HTTPFlow) -> Attempt | None:
    """The attempt `flow` is, if this module is delivering it now."""
    attempt = _attempts.get(flow.id)
    return attempt if attempt is not None and attempt.flow is flow else None


def handler_of(client_id: str) -> ReplayHandler | None:
    """The connection handler of an attempt's mock client (for closing on timeout)."""
    return _handlers.get(client_id)


def make_flow(job: Job) -> http.HTTPFlow:
    """The stored request as a new flow from a mock client, as HTTP/1.1."""
    now = time.time()
    # The request's one key, on every attempt, whatever the stored headers hold.
    headers = [(k, v) for k, v in job.headers if k.lower() != b"idempotency-key"]
    headers.append((b"idempotency-key", job.idempotency_key.encode()))
    if job.body or job.method in BODY_METHODS:  # framed here: the client's framing is not kept
        headers.append((b"content-length", str(len(job.body)).encode()))
    client = connection.Client(
        peername=(job.client_ip or "0.0.0.0", 0),  # noqa: S104 (a label, never bound)
        sockname=NOWHERE,
        timestamp_start=now,
        proxy_mode=_MODE,
    )
    flow = http.HTTPFlow(client, connection.Server(address=NOWHERE))
    flow.request = http.Request(
        host=NOWHERE[0],
        port=NOWHERE[1],
        method=job.method.encode(),
        scheme=b"http",
        authority=b"",
        path=job.path.encode("utf-8", "surrogateescape"),
        http_version=b"HTTP/1.1",
        headers=http.Headers(headers),
        content=job.body,
        trailers=None,
        timestamp_start=now,
        timestamp_end=now,
    )
    flow.metadata[problem.ASYNC_ID] = job.id
    flow.metadata[problem.ASYNC_ATTEMPT] = job.attempt
    return flow


async def run(job: Job, options: Options, keep: int, limit_s: float) -> Attempt:
    """Send one attempt through the pipeline and wait for its end (a response, the
    gateway's answer, or an error). Past `limit_s` (the target's timeouts have failed
    to end it), its connections are closed and the flow gets an error."""
    flow = make_flow(job)
    attempt = Attempt(job, flow, keep)
    handler = ReplayHandler(flow, options)
    # The handler serves a copy of the client; the flow names that one, so that hooks
    # given the connection (server_connect's) and hooks given the flow agree.
    flow.client_conn = handler.client
    _attempts[flow.id] = attempt
    _handlers[flow.client_conn.id] = handler
    try:
        await asyncio.wait_for(handler.replay(), limit_s)
    except TimeoutError:
        attempt.cut = True
        _close(handler)
        if flow.response is None and flow.error is None:
            flow.metadata[problem.ERROR] = f"no end to the attempt after {limit_s:.0f} s"
    finally:
        del _attempts[flow.id]
        del _handlers[flow.client_conn.id]
    return attempt


def _close(handler: ReplayHandler) -> None:
    for io in list(handler.transports.values()):
        task: Any = io.handler
        if task is not None:
            task.cancel()
