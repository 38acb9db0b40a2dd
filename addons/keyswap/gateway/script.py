"""The mitmproxy script inside the installed package, which `keyswap serve` passes to
mitmdump: the same gateway as `addons/gateway.py` in a checkout."""

from keyswap.gateway.assembly import build

addons = build()
