"""What the gateway decided, and how it says so: keyswap-* headers and RFC 9457
problem+json bodies. Decisions other addons need live in `flow.metadata`."""

from __future__ import annotations

import json
from typing import Final, Literal

from mitmproxy import http

from keyswap.config.secrets import mask_tokens

# flow.metadata keys
REQUEST_ID = "keyswap.request_id"
PROXY = "keyswap.proxy"
ROUTE = "keyswap.route"
REST = "keyswap.rest"
TARGET = "keyswap.target"
CODE = "keyswap.code"
MESSAGE = "keyswap.message"
ERROR = "keyswap.error"
RESERVED = "keyswap.reserved"
ANSWERED = "keyswap.answered"  # the gateway answered the request itself
DESTINATION = "keyswap.destination"
CORS_ORIGIN = "keyswap.cors_origin"
PATH = "keyswap.path"  # as the client sent it
BYTES_IN = "keyswap.bytes_in"  # counted for streamed bodies
BYTES_OUT = "keyswap.bytes_out"
ATTEMPTS = "keyswap.attempts"
ASYNC_ID = "keyswap.async_id"  # a respond-async request: its 202, or one of its attempts
ASYNC_ATTEMPT = "keyswap.async_attempt"  # which delivery attempt this flow is (from 1)
FORWARD = "keyswap.forward"  # forward mode: the origin the request goes to (its tunnel's)
PASSTHROUGH = "keyswap.passthrough"  # forward mode: tunnelled or passed on untouched

# response headers
CODE_HEADER = "keyswap-proxy-code"
MESSAGE_HEADER = "keyswap-proxy-message"
REQUEST_ID_HEADER = "keyswap-request-id"
EXPOSED = ", ".join((CODE_HEADER, MESSAGE_HEADER, REQUEST_ID_HEADER))

GRANTED: Final = "proxy-access-granted"
DENIED: Final = "proxy-access-denied"
PROXY_ERROR: Final = "proxy-error"
Code = Literal["proxy-access-granted", "proxy-access-denied", "proxy-error"]

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

# The `error.type` of a problem body, by status: the words the Anthropic and Stripe APIs
# use, so that their SDKs (and OpenAI's, which reads only the status and
# `error.message`) raise the exception class they raise for the API's own refusal of
# that status. None collides with a type Stripe's SDK treats specially
# (`idempotency_error`, its v2 types). Other 4xx: invalid_request_error; 5xx: api_error.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    429: "rate_limit_error",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    """The SDK-facing `error.type` of a gateway-made problem response."""
    return ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def one_line(text: str) -> str:
    """A header-safe single line of printable ASCII."""
    if text.isascii() and text.isprintable() and "  " not in text and len(text) <= 300:
        return text.strip()  # already one line: the common case, without a character loop
    cleaned = "".join(c if " " <= c <= "~" else " " for c in text)
    return " ".join(cleaned.split())[:300]


def decide(flow: http.HTTPFlow, code: Code, message: str) -> None:
    flow.metadata[CODE] = code
    # A message may quote the client (an origin, a header name): never a token in it,
    # since the message is also a response header that mitmweb shows and flows keep.
    flow.metadata[MESSAGE] = one_line(mask_tokens(message))


def stamp(flow: http.HTTPFlow, response: http.Response) -> None:
    """Put the keyswap-* headers on a response the gateway sends or passes on. The
    response carries none yet (new, or filtered), so they are appended in one step."""
    meta = flow.metadata
    response.headers.fields += (
        (b"keyswap-proxy-code", meta.get(CODE, GRANTED).encode()),
        (b"keyswap-proxy-message", meta.get(MESSAGE, "").encode()),
        (b"keyswap-request-id", meta.get(REQUEST_ID, "").encode()),
    )
    origin = meta.get(CORS_ORIGIN)
    if origin:  # an allowed browser origin may read the answer, and these headers
        headers = response.headers
        headers["access-control-allow-origin"] = origin
        headers["access-control-expose-headers"] = EXPOSED
        vary = headers.get("vary", "")
        if "origin" not in (v.strip().lower() for v in vary.split(",")):
            headers["vary"] = f"{vary}, Origin" if vary else "Origin"


def make(
    flow: http.HTTPFlow,
    status: int,
    reason: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> http.Response:
    """A gateway-made application/problem+json response, with the keyswap-* headers.
    `reason` is a slug (`wrong-token`, `rate-limit`, ...) that becomes the problem type.
    The extension member `error` says the same in the shape API SDKs read (OpenAI,
    Anthropic, Stripe): `{type, code, message}`, `code` being the slug."""
    code: Code = PROXY_ERROR if status >= 500 else DENIED
    decide(flow, code, message)
    detail = flow.metadata[MESSAGE]
    body = {
        "type": f"urn:keyswap:problem:{reason}",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "request_id": flow.metadata.get(REQUEST_ID, ""),
        "error": {"type": error_type(status), "code": reason, "message": detail},
    }
    response = http.Response.make(
        status,
        json.dumps(body).encode(),
        {
            "content-type": "application/problem+json",
            "cache-control": "no-store",
            **(headers or {}),
        },
    )
    stamp(flow, response)
    return response


def deny(
    flow: http.HTTPFlow,
    status: int,
    reason: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> None:
    """Refuse the request: the client gets a problem response, the target nothing."""
    # mitmproxy answers once the body is in: a small one is read, a large one cut off
    # (see GatewayStream.check_body_size); no `100 Continue` invites it.
    flow.request.stream = False
    if "expect" in flow.request.headers:
        del flow.request.headers["expect"]
    flow.response = make(flow, status, reason, message, headers)
    flow.metadata[ANSWERED] = True
