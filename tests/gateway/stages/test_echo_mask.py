import gzip
import sys
import zlib

import brotli  # type: ignore[import-untyped]
import pytest
from mitmproxy import http
from mitmproxy.flow import Error
from mitmproxy.test import tflow

from keyswap.config.model import Config

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd
from keyswap.config.secrets import Redaction
from keyswap.gateway import problem
from keyswap.gateway.stages.echo_mask import BodyDecoder, EchoMask, StreamMask

SECRET = "sk-echoed-secret-9f8e7d6c"
REDACTION = Redaction(
    Config.model_validate(
        {"credentials": {"k": {"type": "bearer", "token": SECRET}}},
    )
)


def forward_flow(body: bytes, **headers: str) -> http.HTTPFlow:
    response = http.Response.make(200)
    response.headers.update(headers)
    response.raw_content = body  # as it came, encoded
    flow = tflow.tflow(resp=response)
    flow.metadata[problem.FORWARD] = "https://api.example"
    return flow


def streamed(chunks: list[bytes], coding: str = "") -> tuple[bytes, list[bytes]]:
    mask = StreamMask(REDACTION, BodyDecoder(coding), None)
    out = [mask(chunk) for chunk in chunks] + [mask(b"")]
    sent = [piece for piece in out if piece != []]  # no chunk sent
    return b"".join(sent), sent


@pytest.mark.parametrize("size", [1, 2, 5, 7, 13, 64])
def test_a_streamed_secret_is_masked_however_the_chunks_cut_it(size: int) -> None:
    body = f'{{"echo": "Bearer {SECRET}", "again": "{SECRET}"}}'.encode()
    whole, _ = streamed([body[i : i + size] for i in range(0, len(body), size)])
    assert whole == body.replace(SECRET.encode(), b"********")


def test_only_what_may_begin_a_secret_is_held_back() -> None:
    # A server-sent event passes at once: its end cannot begin a secret.
    _, out = streamed([b"data: one\n\n", b"data: two\n\n"])
    assert out == [b"data: one\n\n", b"data: two\n\n", b""]
    # The start of the secret waits for the next chunk; it was not the secret after all.
    _, out = streamed([b"data: sk-echo", b"ing\n\n"])
    assert out == [b"data: ", b"sk-echoing\n\n", b""]
    # A chunk held back whole sends nothing: an empty chunk would end a chunked body.
    assert StreamMask(REDACTION, BodyDecoder(""), None)(b"sk-ech") == []


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("br", brotli.compress),
        ("zstd", zstd.compress),
        ("gzip", lambda b: gzip.compress(b[:5000]) + gzip.compress(b[5000:])),  # two members
    ],
)
def test_a_compressed_stream_is_decoded_and_masked(coding: str, encode) -> None:  # type: ignore[no-untyped-def]
    body = (b"x" * 1000 + SECRET.encode()) * 20
    encoded = encode(body)
    whole, _ = streamed([encoded[i : i + 17] for i in range(0, len(encoded), 17)], coding)
    assert whole == body.replace(SECRET.encode(), b"********")


@pytest.mark.parametrize(
    "encoded",
    [
        gzip.compress(b"fine") + b"TRAILING " + SECRET.encode(),  # plain text after the end
        zlib.compress(b"fine") + b"x" + zlib.compress(SECRET.encode()),
        b"not gzip at all " + SECRET.encode(),
    ],
)
def test_bytes_that_are_not_the_coding_are_never_passed_on(encoded: bytes) -> None:
    flow = forward_flow(encoded, **{"content-encoding": "gzip"})
    EchoMask(lambda: REDACTION).response(flow)
    assert flow.response is not None and flow.response.status_code == 502
    assert SECRET.encode() not in (flow.response.raw_content or b"")
    whole, _ = streamed([encoded], "gzip")
    assert SECRET.encode() not in whole


def test_an_unfinished_body_is_refused() -> None:
    flow = forward_flow(gzip.compress(SECRET.encode() * 10)[:-12], **{"content-encoding": "gzip"})
    EchoMask(lambda: REDACTION).response(flow)
    assert flow.response is not None and flow.response.status_code == 502


@pytest.mark.parametrize(
    "headers",
    [
        {"content-encoding": "compress"},
        {"content-encoding": "rot13"},  # mitmproxy would decode it with codecs
        {"content-encoding": "gzip, br"},
        {"transfer-encoding": "gzip, chunked"},
    ],
)
def test_a_coding_keyswap_cannot_read_is_refused(headers: dict[str, str]) -> None:
    flow = forward_flow(SECRET.encode(), **headers)
    stage = EchoMask(lambda: REDACTION)
    stage.responseheaders(flow)
    stage.response(flow)
    assert flow.response is not None and flow.response.status_code == 502
    assert flow.metadata[problem.CODE] == problem.PROXY_ERROR
    assert SECRET.encode() not in (flow.response.raw_content or b"")


def test_a_streamed_answer_keyswap_cannot_read_is_cut_off() -> None:
    flow = forward_flow(b"", **{"content-encoding": "rot13"})
    flow.response.stream = True  # type: ignore[union-attr]
    EchoMask(lambda: REDACTION).responseheaders(flow)
    assert flow.error is not None and flow.error.msg == Error.KILLED_MESSAGE
    assert "cannot be checked for secrets" in flow.metadata[problem.ERROR]


def test_a_stream_that_breaks_its_coding_is_cut_off() -> None:
    flow = forward_flow(b"", **{"content-encoding": "gzip"})
    response = flow.response
    assert response is not None
    response.stream = True
    stage = EchoMask(lambda: REDACTION)
    stage.responseheaders(flow)
    mask = response.stream
    assert isinstance(mask, StreamMask)
    mask(gzip.compress(b"fine")[:-4])  # ends early
    mask(b"")
    stage.response(flow)
    assert flow.error is not None and flow.error.msg == Error.KILLED_MESSAGE


def test_a_buffered_answer_is_masked_in_its_headers_and_its_body_and_sent_decoded() -> None:
    body = f"you sent {SECRET}".encode()
    flow = forward_flow(gzip.compress(body), **{"content-encoding": "gzip", "x-echo": SECRET})
    EchoMask(lambda: REDACTION).response(flow)
    response = flow.response
    assert response is not None and response.headers["x-echo"] == "********"
    assert "content-encoding" not in response.headers  # sent decoded, with its own length
    assert response.raw_content == b"you sent ********"
    assert response.headers["content-length"] == str(len(b"you sent ********"))


def test_the_reason_phrase_and_header_names_are_masked_too() -> None:
    flow = forward_flow(b"", **{f"x-{SECRET}": "1", "x-other": "2"})
    assert flow.response is not None
    flow.response.reason = f"OK {SECRET}"
    flow.response.trailers = http.Headers(**{"x-trailer": SECRET})
    EchoMask(lambda: REDACTION).response(flow)
    assert flow.response.reason == "OK ********"
    assert list(flow.response.headers) == ["content-length", "x-other"]
    assert flow.response.trailers["x-trailer"] == "********"


@pytest.mark.parametrize("coding", ["gzip", "identity"])
def test_a_streamed_answer_reaches_the_client_decoded_and_chunked(coding: str) -> None:
    # masking changes the length: the target's content-length cannot stay
    flow = forward_flow(b"", **{"content-encoding": coding, "content-length": "99"})
    response = flow.response
    assert response is not None
    response.stream = True
    EchoMask(lambda: REDACTION).responseheaders(flow)
    assert "content-encoding" not in response.headers and "content-length" not in response.headers
    assert response.headers["transfer-encoding"] == "chunked"
    assert isinstance(response.stream, StreamMask)


def test_reverse_mode_and_gateway_answers_are_left_alone() -> None:
    flow = forward_flow(SECRET.encode())
    del flow.metadata[problem.FORWARD]
    EchoMask(lambda: REDACTION).response(flow)
    assert flow.response is not None and flow.response.content == SECRET.encode()
