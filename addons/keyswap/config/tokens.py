"""Proxy credentials: `ks_<43 url-safe chars>` tokens, stored as sha256 hex digests."""

from __future__ import annotations

import hashlib
import re
import secrets

PREFIX = "ks_"
# Anything shaped like a proxy token, wherever it stands: never forwarded, never shown.
SHAPE = re.compile(r"ks_[A-Za-z0-9_-]{43}")
LENGTH = 46  # of a token, `ks_` and 43 characters
SHAPE_BYTES = re.compile(SHAPE.pattern.encode())
# Where a client may present its proxy credential; never forwarded to the target.
TOKEN_HEADERS = ("authorization", "x-proxy-token")


def new_token() -> str:
    """A fresh proxy token: `ks_` and 32 random bytes, url-safe base64 (43 chars)."""
    return PREFIX + secrets.token_urlsafe(32)


def digest(token: str | bytes) -> str:
    """The sha256 hex digest the config stores instead of the token."""
    data = token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token
    return hashlib.sha256(data).hexdigest()


def without_tokens(query: str) -> str:
    """A query string without the parameters that hold something shaped like a token."""
    if "ks_" not in query:
        return query
    return "&".join(p for p in query.split("&") if not SHAPE.search(p))
