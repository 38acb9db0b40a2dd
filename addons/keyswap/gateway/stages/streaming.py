"""Streaming: large or unbounded bodies pass through without being held in memory;
server-sent events pass event by event."""

from __future__ import annotations

from mitmproxy import http

from keyswap.gateway import delivery, problem
from keyswap.net import fields

# Bodies up to this size are buffered (cheap, and visible in mitmweb); larger ones stream.
BUFFER_LIMIT = 64 * 1024


def _framing(shape: fields.Shape) -> tuple[bool, int | None, int | None]:
    """Chunked?, and where the content type and the content length are."""
    lengths = shape.lowered.count(b"content-length")
    chunked = b"transfer-encoding" in shape.first or lengths > 1  # ambiguous: stream it
    return chunked, shape.first.get(b"content-type"), shape.first.get(b"content-length")


def _should_stream(message: http.Message) -> bool:
    """Chunked, longer than the buffer limit, of unknown length (a response that ends
    when the server closes) or a server-sent event stream."""
    headers = message.headers
    chunked, content_type, length = fields.shape(headers).decide("framing", _framing)
    if chunked:
        return True
    raw = headers.fields
    if content_type is not None and raw[content_type][1][:17].lower() == b"text/event-stream":
        return True
    if length is None:
        return isinstance(message, http.Response)
    try:
        return int(raw[length][1]) > BUFFER_LIMIT
    except ValueError:
        return True


class ByteCounter:
    """A stream callable that passes chunks on unchanged and counts them."""

    def __init__(self, flow: http.HTTPFlow, key: str) -> None:
        self.metadata = flow.metadata
        self.key = key
        self.metadata[key] = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.metadata[self.key] += len(chunk)
        return chunk


class Streaming:
    """Turns on mitmproxy's per-flow streaming where holding the body would cost memory."""

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or problem.DESTINATION not in flow.metadata:
            return
        if _should_stream(flow.request):
            flow.request.stream = ByteCounter(flow, problem.BYTES_IN)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or flow.metadata.get(problem.ANSWERED):
            return
        if _should_stream(response):
            attempt = delivery.attempt_of(flow)
            # An async attempt's answer is kept for its client, up to a bound.
            response.stream = attempt.capture if attempt else ByteCounter(flow, problem.BYTES_OUT)
