"""The one place where bytes a client sent become text for a record (a log row, a log
line, a message): always valid UTF-8, however malformed the input, and bounded.

mitmproxy hands header values, methods and paths over as `str` decoded with
`surrogateescape`, so a byte that is not UTF-8 (`\\xff`) arrives as a lone surrogate,
which SQLite, JSON encoders and terminals refuse. Here such a byte is shown as `\\xff`
instead, and text past `limit` characters is cut with a marker saying how much was cut."""

from __future__ import annotations

# A field of the activity log holds at most this many characters (a URL within
# `limits.max_url_bytes` always fits).
FIELD_LIMIT = 8192


def shown(value: str | bytes, limit: int = FIELD_LIMIT) -> str:
    """`value` as text that any store accepts: invalid UTF-8 as `\\xNN`, at most `limit`
    characters (plus the cut marker)."""
    if isinstance(value, bytes):
        text = value.decode("utf-8", "backslashreplace")
    elif value.isascii():
        text = value
    else:
        try:
            value.encode("utf-8")
            text = value
        except UnicodeEncodeError:
            try:  # the bytes the client sent, when surrogateescape made the surrogates
                raw = value.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raw = value.encode("utf-8", "backslashreplace")
            text = raw.decode("utf-8", "backslashreplace")
    if len(text) > limit:
        return f"{text[:limit]}…[{len(text) - limit} more characters]"
    return text
