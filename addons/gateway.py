"""keyswap's mitmproxy entry point: `mitmdump -s addons/gateway.py ...`.

The stages and their order are in `keyswap/gateway/assembly.py`."""

from keyswap.gateway.assembly import build

addons = build()
