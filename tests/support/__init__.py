"""What the tests share: the repository's root, and real processes and proxies to start
on loopback (the gateway, the echo target, squid, stunnel, an OAuth2 server)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
