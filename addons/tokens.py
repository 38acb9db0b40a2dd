"""Proxy credentials: `ks_<43 url-safe chars>` tokens, stored as sha256 hex digests."""

from __future__ import annotations

import hashlib
import secrets

from mitmproxy.http import Headers

from keyswap import fields

PREFIX = "ks_"
# Where a client may present its proxy credential; never forwarded to the target.
TOKEN_HEADERS = ("authorization", "x-proxy-token")


def new_token() -> str:
    """A fresh proxy token: `ks_` and 32 random bytes, url-safe base64 (43 chars)."""
    return PREFIX + secrets.token_urlsafe(32)


def digest(token: str | bytes) -> str:
    """The sha256 hex digest the config stores instead of the token."""
    data = token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token
    return hashlib.sha256(data).hexdigest()


def presented_token(headers: Headers) -> str | None:
    """The proxy token a request carries: `x-proxy-token: <t>`, `Authorization: Bearer <t>`
    or `Authorization: <t>`."""
    token = fields.get(headers, b"x-proxy-token")
    if token:
        return token.strip()
    auth = (fields.get(headers, b"authorization") or "").strip()
    scheme, _, rest = auth.partition(" ")
    if rest and scheme.lower() == "bearer":
        return rest.strip()
    return auth or None
