import pytest
from mitmproxy import http

from keyswap.gateway.stages.streaming import BUFFER_LIMIT, _should_stream

BIG = str(BUFFER_LIMIT + 1)


@pytest.mark.parametrize(
    ("headers", "streams"),
    [
        ([("Content-Length", "10")], False),
        ([("Content-Length", BIG)], True),
        ([("Transfer-Encoding", "chunked")], True),
        ([("Content-Length", "10"), ("Content-Length", "10")], True),  # ambiguous
        ([("Content-Length", "ten")], True),
        ([("Content-Type", "Text/Event-Stream; charset=utf-8"), ("Content-Length", "5")], True),
        ([("Content-Type", "application/json"), ("Content-Length", "5")], False),
        ([], True),  # a response without a length ends when the server closes
    ],
)
def test_responses(headers: list[tuple[str, str]], streams: bool) -> None:
    response = http.Response.make(200)
    response.headers.fields = tuple((k.encode(), v.encode()) for k, v in headers)
    assert _should_stream(response) is streams


def test_a_request_without_a_length_has_no_body_to_stream() -> None:
    request = http.Request.make("GET", "http://x/", b"")
    request.headers.fields = ((b"Host", b"x"),)
    assert _should_stream(request) is False
