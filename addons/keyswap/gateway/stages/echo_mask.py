"""Forward mode's answers reach a program that must never learn a target credential:
a target's response that echoes one (a debug endpoint, an error quoting the request's
headers) comes back with it masked as `********`: in its reason phrase, header values
(a field whose name holds one is dropped), trailers, body and WebSocket messages.

A body is read only in a coding keyswap decodes strictly itself (identity, gzip,
deflate, br, zstd: every byte must belong to a complete encoded stream, so nothing can
hide after the end or in a coding a client reads more leniently) and only with plain
`chunked` or no transfer coding; anything else is not passed on (502): it could hold a
secret. A buffered body is decoded, masked and then reaches the client decoded when it
held a secret (unchanged otherwise). A streamed one is decoded and masked as it passes,
and reaches the client decoded and chunked, holding back only the bytes at a chunk's
end that may begin a secret the next chunk finishes (a server-sent event's blank line
never does, so events still pass one by one)."""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable
from typing import Any

import brotli  # type: ignore[import-untyped]
from mitmproxy import http, websocket

from keyswap.config.secrets import Redaction
from keyswap.gateway import problem

if sys.version_info >= (3, 14):
    from compression import zstd
else:  # as mitmproxy, which brings it
    from backports import zstd

UNREADABLE = "keyswap.unreadable"  # why an answer cannot be checked for secrets
UNREADABLE_MESSAGE = "the target's answer cannot be checked for secrets ({}): not passed on"
CODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate", "br", "zstd"})


class BodyDecoder:
    """Decodes one body in a content coding, strictly: several gzip members, zlib
    streams or zstd frames may follow each other, but nothing else; `finished` says
    whether the last one ended. Raises ValueError on anything that is not the coding."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._part = self._new()

    def _new(self) -> Any:
        if self.coding in ("gzip", "x-gzip", "deflate"):
            return zlib.decompressobj(47)  # a gzip or a zlib header, as mitmproxy reads them
        if self.coding == "br":
            return brotli.Decompressor()
        if self.coding == "zstd":
            return zstd.ZstdDecompressor()
        if self.coding in ("", "identity"):
            return None
        raise ValueError(f"content-encoding: {self.coding}")

    def feed(self, data: bytes) -> bytes:
        part = self._part
        if part is None:
            return data
        try:
            if self.coding == "br":
                if data and part.is_finished():
                    raise ValueError("data after the end of a br stream")
                return bytes(part.process(data))
            out = []
            while data:
                if part.eof:  # the previous member ended: the rest must be another
                    part = self._part = self._new()
                out.append(part.decompress(data))
                data = part.unused_data if part.eof else b""
            return b"".join(out)
        except (zlib.error, brotli.error, zstd.ZstdError, EOFError) as e:
            raise ValueError(f"not valid {self.coding}: {e}") from None

    @property
    def finished(self) -> bool:
        part = self._part
        if part is None:
            return True
        return bool(part.is_finished() if self.coding == "br" else part.eof)


def coding_of(response: http.Response) -> str:
    return str(response.headers.get("content-encoding", "")).strip().lower()


def unreadable(response: http.Response) -> str | None:
    """Why keyswap cannot read the answer's body to mask it, or None."""
    coding = coding_of(response)
    if coding not in CODINGS:
        return f"content-encoding: {coding}"
    framing = response.headers.get("transfer-encoding", "").strip().lower()
    if framing not in ("", "chunked"):
        return f"transfer-encoding: {framing}"
    return None


class StreamMask:
    """A response's `stream` callable: decodes, masks, and passes each chunk on to the
    one that was there before (which counts the bytes)."""

    def __init__(
        self, redact: Redaction, decoder: BodyDecoder, then: Callable[[bytes], Any] | None
    ) -> None:
        self.redact, self.decoder, self.then = redact, decoder, then
        self.held = b""
        self.broken: str | None = None  # why the body is not what its coding says

    def __call__(self, chunk: bytes) -> Any:
        if chunk:
            try:
                decoded = self.decoder.feed(chunk)
            except ValueError as e:
                decoded = b""  # what is not the coding is never passed on
                self.broken = self.broken or str(e)
            data = self.redact.mask_values(self.held + decoded)
            keep = self.redact.unfinished(data)
            self.held, data = data[len(data) - keep :], data[: len(data) - keep]
            if not data:
                return []  # no chunk: an empty one would end a chunked body
        else:  # the end: what was held back is not the start of a secret after all
            data, self.held = self.held, b""
            if not self.decoder.finished:
                self.broken = self.broken or f"the {self.decoder.coding} body ends early"
        return self.then(data) if self.then is not None else data


class EchoMask:
    """Masks the target credentials in what forward mode passes back to the client."""

    def __init__(self, redaction: Callable[[], Redaction]) -> None:
        self.redaction = redaction

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or not _masked(flow):
            return
        redact = self.redaction()
        _mask_head(response, redact)
        if why := unreadable(response):
            flow.metadata[UNREADABLE] = why
            if response.stream:  # too large to read whole for a 502: cut off instead
                _cut(flow, why)
            return  # read whole, then refused (`response`)
        if not response.stream:
            return  # masked whole once it is in (`response`)
        coding = coding_of(response)
        headers = response.headers
        headers.pop("content-encoding", None)  # the client gets it decoded
        headers.pop("content-length", None)  # and masked: another length
        if response.http_version.startswith("HTTP/1") and "transfer-encoding" not in headers:
            headers["transfer-encoding"] = "chunked"
        previous = response.stream if callable(response.stream) else None
        response.stream = StreamMask(redact, BodyDecoder(coding), previous)

    def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or not _masked(flow):
            return
        if why := flow.metadata.get(UNREADABLE) or unreadable(response):  # (a retry's too)
            _refuse(flow, why)
            return
        redact = self.redaction()
        _mask_head(response, redact)  # again: an OAuth2 retry brings a new response
        if response.trailers:
            response.trailers.fields = _masked_fields(response.trailers.fields, redact)
        if isinstance(response.stream, StreamMask) and response.stream.broken:
            _cut(flow, response.stream.broken)  # sent in part: the client must not take it whole
            return
        raw = response.raw_content
        if response.stream or not raw:
            return
        decoder = BodyDecoder(coding_of(response))
        try:
            body = decoder.feed(raw)
        except ValueError as e:
            _refuse(flow, str(e))
            return
        if not decoder.finished:
            _refuse(flow, f"the {coding_of(response)} body ends early")
            return
        if redact.holds_value(body) or (body is not raw and redact.holds_value(raw)):
            response.headers.pop("content-encoding", None)
            response.content = redact.mask_values(body)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        if problem.FORWARD not in flow.metadata or flow.websocket is None:
            return
        message: websocket.WebSocketMessage = flow.websocket.messages[-1]
        if not message.from_client:
            message.content = self.redaction().mask_values(message.content)


def _masked(flow: http.HTTPFlow) -> bool:
    """Whether the flow's answer is the target's, in forward mode."""
    meta = flow.metadata
    if problem.FORWARD not in meta:
        return False
    return not (meta.get(problem.ANSWERED) or meta.get(problem.PASSTHROUGH))


def _mask_head(response: http.Response, redact: Redaction) -> None:
    data = response.data
    data.reason = redact.mask_values(data.reason)
    data.headers.fields = _masked_fields(data.headers.fields, redact)


def _masked_fields(
    raw: tuple[tuple[bytes, bytes], ...], redact: Redaction
) -> tuple[tuple[bytes, bytes], ...]:
    """Header fields with every secret value masked; a field whose name holds one is
    dropped (a name cannot be masked and stay a name)."""
    if not redact.holds_value(b"\n".join(k + b"\n" + v for k, v in raw)):
        return raw
    return tuple((k, redact.mask_values(v)) for k, v in raw if not redact.holds_value(k))


def _cut(flow: http.HTTPFlow, why: str) -> None:
    """Ends the answer without passing the rest on: the client sees it broken off."""
    flow.metadata[problem.ERROR] = UNREADABLE_MESSAGE.format(why)
    if flow.killable:
        flow.kill()


def _refuse(flow: http.HTTPFlow, why: str) -> None:
    flow.response = problem.make(flow, 502, "unreadable-answer", UNREADABLE_MESSAGE.format(why))
    flow.metadata[problem.ANSWERED] = True
