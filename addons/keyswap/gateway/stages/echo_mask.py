"""Forward mode's answers reach a program that must never learn a target credential:
a target's response that echoes one (a debug endpoint, an error quoting the request's
headers) comes back with it masked as `********`, in its headers and its body.

A buffered body is decoded first (gzip, deflate, br, zstd), masked, and encoded again;
a streamed one is decoded and masked as it passes, holding back only the bytes at a
chunk's end that may begin a secret the next chunk finishes (a server-sent event's
blank line never does, so events still pass one by one), and reaches the client
decoded. A body keyswap cannot decode is read whole and not passed on (502): it could
hold a secret. WebSocket messages from the target are masked too."""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable
from typing import Any

import brotli  # type: ignore[import-untyped]
from mitmproxy import http, websocket

if sys.version_info >= (3, 14):
    from compression import zstd
else:  # as mitmproxy, which brings it
    from backports import zstd

from keyswap.config.secrets import Redaction
from keyswap.gateway import problem

UNREADABLE = "the target's answer is encoded in a way keyswap cannot inspect ({}): not passed on"


Decoder = Callable[[bytes], bytes]


def stream_decoder(name: str) -> Decoder | None:
    """A decoder of one streamed body in `name`'s content coding, or None when keyswap
    knows none (`identity` decodes to itself)."""
    if name in ("", "identity"):
        return lambda chunk: chunk
    decoder: Any
    if name in ("gzip", "x-gzip", "deflate"):
        decoder = zlib.decompressobj(47)  # gzip or zlib headers, as mitmproxy reads them
        return lambda chunk: decoder.decompress(chunk)
    if name == "br":
        decoder = brotli.Decompressor()
        return lambda chunk: bytes(decoder.process(chunk))
    if name == "zstd":
        decoder = zstd.ZstdDecompressor()
        return lambda chunk: bytes(decoder.decompress(chunk))
    return None


class StreamMask:
    """A response's `stream` callable: decodes, masks, and passes each chunk on to the
    one that was there before (which counts the bytes)."""

    def __init__(
        self, redact: Redaction, decode: Decoder, then: Callable[[bytes], Any] | None
    ) -> None:
        self.redact, self.decode, self.then = redact, decode, then
        self.held = b""

    def __call__(self, chunk: bytes) -> Any:
        if chunk:
            data = self.redact.mask_values(self.held + self.decode(chunk))
            keep = self.redact.unfinished(data)
            self.held, data = data[len(data) - keep :], data[: len(data) - keep]
        else:  # the end: what was held back is not the start of a secret after all
            data, self.held = self.held, b""
        return self.then(data) if self.then is not None else data


class EchoMask:
    """Masks the target credentials in what forward mode passes back to the client."""

    def __init__(self, redaction: Callable[[], Redaction]) -> None:
        self.redaction = redaction

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or problem.FORWARD not in flow.metadata:
            return
        if flow.metadata.get(problem.ANSWERED) or flow.metadata.get(problem.PASSTHROUGH):
            return
        redact = self.redaction()
        _mask_headers(response, redact)
        if not response.stream:
            return  # masked whole once it is in (`response`)
        coding = response.headers.get("content-encoding", "").strip().lower()
        decode = stream_decoder(coding)
        if decode is None:
            response.stream = False  # read whole, then refused (`response`): see there
            return
        if coding not in ("", "identity"):
            del response.headers["content-encoding"]
            response.headers.pop("content-length", None)
            if response.http_version.startswith("HTTP/1") and "transfer-encoding" not in (
                response.headers
            ):
                response.headers["transfer-encoding"] = "chunked"
        previous = response.stream if callable(response.stream) else None
        response.stream = StreamMask(redact, decode, previous)

    def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or problem.FORWARD not in flow.metadata or response.stream:
            return
        if flow.metadata.get(problem.ANSWERED) or flow.metadata.get(problem.PASSTHROUGH):
            return
        redact = self.redaction()
        _mask_headers(response, redact)  # again: an OAuth2 retry brings a new response
        if not response.raw_content:
            return
        try:
            body = response.get_content(strict=True)
        except ValueError:
            _refuse(flow, response.headers.get("content-encoding", ""))
            return
        if body is not None and redact.holds_value(body):
            response.content = redact.mask_values(body)  # encoded again as it came

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        if problem.FORWARD not in flow.metadata or flow.websocket is None:
            return
        message: websocket.WebSocketMessage = flow.websocket.messages[-1]
        if not message.from_client:
            message.content = self.redaction().mask_values(message.content)


def _mask_headers(response: http.Response, redact: Redaction) -> None:
    raw = response.headers.fields
    if redact.holds_value(b"\n".join(v for _, v in raw)):
        response.headers.fields = tuple((k, redact.mask_values(v)) for k, v in raw)


def _refuse(flow: http.HTTPFlow, coding: str) -> None:
    flow.response = problem.make(flow, 502, "unreadable-answer", UNREADABLE.format(coding))
    flow.metadata[problem.ANSWERED] = True
