"""How URLs are written: one formatter for authorities and origins, so an IPv6 address
and a default port look the same in a Host header, a URL and a log row; and one editor
for a query parameter, which keeps the rest of the query string byte for byte."""

from __future__ import annotations

from urllib.parse import quote


def hostport(host: str, port: int) -> str:
    """`host:port`, an IPv6 host in brackets (a CONNECT authority, a log's address)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def authority(host: str, port: int, scheme: str) -> str:
    """`host[:port]` as a Host header says it (the port only when not the default)."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port == (443 if scheme == "https" else 80) else f"{shown}:{port}"


def origin_of(scheme: str, host: str, port: int) -> str:
    """`scheme://host[:port]`, the port only when not the scheme's default."""
    return f"{scheme}://{authority(host, port, scheme)}"


def with_query_param(path: str, name: str, value: str) -> str:
    """`path` with every `name=` parameter replaced by one `name=value`; the rest of the
    query string is kept byte for byte."""
    base, _, query = path.partition("?")
    key = quote(name, safe="")
    kept = [p for p in query.split("&") if p and p.split("=", 1)[0] != key]
    return f"{base}?{'&'.join([*kept, f'{key}={quote(value, safe="*")}'])}"
