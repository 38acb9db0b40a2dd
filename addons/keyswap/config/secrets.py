"""The one place where secrets are masked: what the config says is secret (header
names, query parameter names, secret values, the proxy token headers) and how a view
(the activity log, `keyswap curl`, a stored flow) shows it: `********`."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from itertools import compress
from urllib.parse import quote

from mitmproxy import http
from pydantic import BaseModel, SecretStr

from keyswap.config.model import BasicCredential, Config, HeaderCredential, QueryCredential
from keyswap.config.tokens import SHAPE as TOKEN_SHAPE
from keyswap.config.tokens import SHAPE_BYTES as TOKEN_SHAPE_BYTES
from keyswap.config.tokens import TOKEN_HEADERS
from keyswap.net import fields
from keyswap.net.text import shown
from keyswap.net.urls import with_query_param

MASK = "********"
MASK_BYTES = MASK.encode()
# A log row shows at most this many header fields, and this many bytes of their values.
LOGGED_HEADERS = 100
LOGGED_HEADER_BYTES = 65536
ALWAYS_REDACTED = frozenset({*TOKEN_HEADERS, "proxy-authorization", "cookie", "set-cookie"})


# The escaping json.dumps applies to every string: quotes added, ASCII out.
_ESCAPE = json.encoder.encode_basestring_ascii
_PRINTABLE = bytes(range(0x20, 0x7F))


class Redaction:
    """What is secret: the config's header names, query names and values, and the
    values issued at run time (`extra`: OAuth2 tokens)."""

    def __init__(self, config: Config | None, extra: Iterable[str] = ()) -> None:
        names = set(ALWAYS_REDACTED)
        params: set[str] = set()
        values: set[str] = set()
        if config is not None:
            for credential in config.credentials.values():
                if isinstance(credential, HeaderCredential):
                    names.add(credential.name)
                elif isinstance(credential, QueryCredential):
                    params.add(credential.name)
            values = {v for v in secret_values(config) if len(v) >= 4}
            for credential in config.credentials.values():
                if isinstance(credential, BasicCredential):
                    pair = f"{credential.username}:{credential.password.get_secret_value()}"
                    values.add(base64.b64encode(pair.encode()).decode())
        values.update(v for v in extra if len(v) >= 4)
        values |= {form for v in values for form in _written_as(v)}
        self.headers = frozenset(names)
        self.params = frozenset(params)
        self.values = sorted(values, key=len, reverse=True)
        self._values_bytes = [v.encode("utf-8", "surrogateescape") for v in self.values]

    def header_dict(self, headers: http.Headers) -> dict[str, str]:
        """The headers redacted, repeated names joined with ", ", as text any store
        accepts; past `LOGGED_HEADERS` fields or `LOGGED_HEADER_BYTES` bytes of values,
        one `…` entry says how many more there were."""
        out: dict[str, str] = {}
        budget = LOGGED_HEADER_BYTES
        raw = headers.fields
        for i, (name, (_, value)) in enumerate(zip(fields.shape(headers).text, raw, strict=True)):
            budget -= len(value)
            if i == LOGGED_HEADERS or budget < 0:
                out["…"] = f"{len(raw) - i} more headers not shown"
                break
            value_text = self._shown(name, shown(value))
            out[name] = f"{out[name]}, {value_text}" if name in out else value_text
        return out

    def _shown(self, name: str, value: str) -> str:
        """A header's value as the log shows it: masked by name, else by secret value."""
        return MASK if name in self.headers else self.text(value)

    def headers_json(self, headers: http.Headers) -> str:
        """`json.dumps(self.header_dict(headers))`, in a few C calls for the usual case:
        printable ASCII values (an ETag's quotes included), no repeated name, no secret
        value. The names and the masked values come from a template made once per header
        shape, and the values, with `\\` and `"` escaped, drop into it. (The C encoder
        costs as much per character as this costs per header.)"""
        raw = headers.fields
        joined = b"\x00".join([v for _, v in raw])
        shape = fields.shape(headers)
        if (
            shape.repeated
            or len(raw) > LOGGED_HEADERS
            or len(joined) > LOGGED_HEADER_BYTES
            or joined.translate(None, _PRINTABLE) != b"\x00" * (len(raw) - 1)
            or self.has_secret(joined)
        ):
            return json.dumps(self.header_dict(headers))
        if b'"' in joined or b"\\" in joined:
            joined = joined.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
        made: tuple[bytes, tuple[bool, ...]] = shape.decide(("json", self.headers), self._template)
        template, keep = made
        return (template % tuple(compress(joined.split(b"\x00"), keep))).decode("ascii")

    def _template(self, shape: fields.Shape) -> tuple[bytes, tuple[bool, ...]]:
        """`{"name": "%s", "secret-name": "********", ...}` and which values fill it."""
        keep = tuple(name not in self.headers for name in shape.text)
        items = [
            f"{_ESCAPE(name).replace('%', '%%')}: " + ('"%s"' if kept else _ESCAPE(MASK))
            for name, kept in zip(shape.text, keep, strict=True)
        ]
        return ("{" + ", ".join(items) + "}").encode("ascii"), keep

    def header(self, headers: http.Headers, name: bytes) -> str | None:
        """One header's value as `header_dict` shows it."""
        value = fields.get(headers, name)
        return None if value is None else self._shown(name.decode(), value)

    def has_secret(self, data: bytes) -> bool:
        """Whether `data` holds a secret value or something shaped like a proxy token."""
        return b"ks_" in data or any(v in data for v in self._values_bytes)

    def holds_value(self, data: bytes) -> bool:
        """Whether `data` holds a secret value (in any of the spellings masked)."""
        return any(v in data for v in self._values_bytes)

    def mask_values(self, data: bytes) -> bytes:
        """`data` with every secret value masked (and nothing else: an answer keyswap
        passes on keeps whatever is shaped like a token)."""
        for value in self._values_bytes:
            if value in data:
                data = data.replace(value, MASK_BYTES)
        return data

    def unfinished(self, data: bytes) -> int:
        """How many bytes at the end of `data` may be the start of a secret value that
        the next bytes finish: a stream masks them when it knows."""
        for size in range(min(self.longest - 1, len(data)), 0, -1):
            tail = data[-size:]
            if any(v.startswith(tail) for v in self._values_bytes):
                return size
        return 0

    @property
    def longest(self) -> int:
        """The longest secret value's length, in bytes (0 when there is none)."""
        return max((len(v) for v in self._values_bytes), default=0)

    def cut(self, data: bytes, limit: int) -> bytes:
        """`data` masked, then cut to at most `limit` bytes, without the start of a
        secret that the cut may have left at its end (a secret is masked whole or its
        first bytes are dropped; `data` must run on past the cut by `longest` bytes)."""
        out = self.mask_bytes(data)[:limit]
        for value in self._values_bytes:
            for size in range(min(len(value) - 1, len(out)), 3, -1):
                if out.endswith(value[:size]):
                    return out[:-size]
        return out

    def mask_bytes(self, data: bytes) -> bytes:
        """`data` with every secret value and every proxy-token-shaped value masked."""
        return mask_token_bytes(self.mask_values(data))

    def url(self, url: str) -> str:
        for name in self.params:
            if f"{quote(name, safe='')}=" in url.partition("?")[2]:
                url = with_query_param(url, name, MASK)
        return self.text(url)

    def text(self, text: str) -> str:
        """`text` with every secret value and every proxy-token-shaped value masked."""
        for value in self.values:
            if value in text:
                text = text.replace(value, MASK)
        return mask_tokens(text)


def _written_as(value: str) -> set[str]:
    """Other spellings of a secret that an answer may hold: percent-encoded (a query
    string echoed; also as keyswap writes a query credential, `*` kept), JSON-escaped,
    base64 (with and without padding)."""
    raw = value.encode("utf-8", "surrogateescape")
    b64 = base64.b64encode(raw).decode()
    encoded = {quote(value, safe=""), quote(value, safe="*")}
    return {*encoded, json.dumps(value)[1:-1], b64, b64.rstrip("=")} - {value}


def mask_tokens(text: str) -> str:
    """`text` with everything shaped like a proxy token masked."""
    return TOKEN_SHAPE.sub(MASK, text) if "ks_" in text else text


def mask_token_bytes(data: bytes) -> bytes:
    """`mask_tokens` for raw header values and request targets."""
    return TOKEN_SHAPE_BYTES.sub(MASK_BYTES, data) if b"ks_" in data else data


def secret_values(model: BaseModel) -> set[str]:
    """Every secret value in a config (or a part of one)."""
    found: set[str] = set()
    for name in type(model).model_fields:
        value = getattr(model, name)
        for item in value.values() if isinstance(value, dict) else [value]:
            if isinstance(item, SecretStr):
                found.add(item.get_secret_value())
            elif isinstance(item, BaseModel):
                found |= secret_values(item)
    return found
