import json

import pytest
from mitmproxy.http import Headers

from keyswap.config.model import Config
from keyswap.config.secrets import Redaction

CONFIG = Config.model_validate(
    {
        "credentials": {
            "h": {"type": "header", "name": "x-api-key", "value": "header-secret-1"},
            "q": {"type": "query", "name": "key", "value": "query-secret-2"},
            "b": {"type": "bearer", "token": "bearer-secret-3"},
        }
    }
)


def test_headers_are_redacted_by_name_and_value() -> None:
    redact = Redaction(CONFIG)
    headers = Headers(
        [
            (b"Authorization", b"Bearer x"),
            (b"X-Api-Key", b"k"),
            (b"Cookie", b"a=1"),
            (b"Cookie", b"b=2"),
            (b"X-Echo", b"got bearer-secret-3 back"),
            (b"Accept", b"*/*"),
        ]
    )
    assert redact.header_dict(headers) == {
        "authorization": "********",
        "x-api-key": "********",
        "cookie": "********, ********",
        "x-echo": "got ******** back",
        "accept": "*/*",
    }


@pytest.mark.parametrize(
    "fields",
    [
        [],
        [(b"Host", b"example.com"), (b"Pct%s", b"100% %s %d"), (b"Empty", b"")],
        [(b"Q", b'say "hi"'), (b"U", "caf\u00e9 \u2603".encode()), (b"C", b"\x01\x1f\x7f")],
        [(b"Bad-Utf8", b"\xff\xfe"), (b"Next", b"c")],
        [(b"ETag", b'W/"abc"'), (b"Back", b"a\\u0000b\\"), (b"Next", b"c")],
        [(b"Nul", b"x\x00y"), (b"Next", b"c")],
        [(b"X-Api-Key", b"k"), (b"Authorization", b"Bearer x"), (b"Accept", b"*/*")],
        [(b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"Vary", b"Origin")],
        [(b"X-Echo", b"got bearer-secret-3 back"), (b"Via", b"1.1 gw")],
    ],
)
def test_header_json_is_json_dumps_of_the_redacted_headers(
    fields: list[tuple[bytes, bytes]],
) -> None:
    redact = Redaction(CONFIG)
    headers = Headers(fields)
    expected = json.dumps(redact.header_dict(headers))
    assert redact.headers_json(headers) == expected
    assert redact.headers_json(headers) == expected  # again, from the shape's template
    assert json.loads(expected).keys() == {k.decode().lower() for k, _ in fields}


def test_one_header_as_the_row_shows_it() -> None:
    redact = Redaction(CONFIG)
    headers = Headers([(b"Origin", b"https://app"), (b"User-Agent", b"ua bearer-secret-3")])
    assert redact.header(headers, b"origin") == "https://app"
    assert redact.header(headers, b"user-agent") == "ua ********"
    assert redact.header(headers, b"referer") is None
    assert Redaction(None).header(Headers(cookie="a=1"), b"cookie") == "********"


def test_urls_mask_credential_query_parameters() -> None:
    redact = Redaction(CONFIG)
    assert redact.url("https://x/y?a=1&key=query-secret-2") == "https://x/y?a=1&key=********"
    assert redact.url("https://x/y?a=1") == "https://x/y?a=1"


def test_mask_bytes_masks_secret_values_and_tokens_in_raw_bytes() -> None:
    redact = Redaction(CONFIG, extra={"issued-oauth-token"})
    token = "ks_" + "A" * 43
    raw = (
        b'{"echo": "Bearer bearer-secret-3", "t": "'
        + token.encode()
        + b'", "o": "issued-oauth-token"}'
    )
    masked = redact.mask_bytes(raw + b"\xff")
    assert masked == b'{"echo": "Bearer ********", "t": "********", "o": "********"}\xff'
    assert redact.mask_bytes(b"nothing secret") == b"nothing secret"


def test_a_cut_never_keeps_part_of_a_secret() -> None:
    redact = Redaction(CONFIG)
    secret = b"bearer-secret-3"
    for keep in range(0, len(secret) + 3):
        data = b"x" * 10 + secret + b"tail"
        cut = redact.cut(data, 10 + keep)
        assert len(cut) <= 10 + keep
        assert secret[:4] not in cut  # masked whole, or its start dropped
    assert redact.cut(b"a" * 10 + secret, 100) == b"a" * 10 + b"********"


def test_other_spellings_of_a_secret_are_masked() -> None:
    import base64
    from urllib.parse import quote

    config = Config.model_validate(
        {
            "credentials": {
                "b": {"type": "basic", "username": "api", "password": "pa ss/word+1"},
            }
        }
    )
    redact = Redaction(config)
    pair = base64.b64encode(b"api:pa ss/word+1")
    for spelled in (
        quote("pa ss/word+1", safe="").encode(),
        base64.b64encode(b"pa ss/word+1"),
        pair,
    ):
        assert redact.mask_bytes(b"echo " + spelled + b" end") == b"echo ******** end"
