"""What the tests share: the repository's root, and real processes and proxies to start
on loopback (the gateway, the echo target, squid, stunnel, an OAuth2 server)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def token_for(base: str, name: str) -> str:
    """Another well-formed proxy token per name (`ks_` and 43 characters, the only shape
    the gateway accepts): `base` with its tail replaced by `name`."""
    return base[: len(base) - len(name)] + name
