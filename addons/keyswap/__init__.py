"""keyswap: a credential-swapping API gateway built from mitmproxy addons."""

__version__ = "0.1.0"
