"""`keyswap_reuse_port`: the gateway's listeners bind with SO_REUSEPORT, so that several
gateway processes serve one address and the kernel spreads the connections between them
(`keyswap serve --workers N` sets it for its workers).

mitmproxy has no such option: AsyncioServerInstance.listen calls
`asyncio.start_server(handler, host, port)` and nothing else. The least it takes to add
one: when the proxyserver announces new listeners, before it starts them (its `changed`
signal, which mitmweb also follows), each new TCP listener of this process gets a
`listen` of its own that makes the same server with `reuse_port=True`. No mitmproxy class
is patched, no other listener is touched, and with the option off nothing is.

It must be configured before the proxyserver binds, and a `-s` script never is: mitmproxy
12.3 loads scripts in a task that runs only after its listeners are up. So `keyswap serve`
adds a ReusePort to the master itself (cli/serve.py); the gateway's own declares the
option for plain mitmdump, where `running` then finds a listener made without
SO_REUSEPORT and stops the gateway with an error that says so, instead of sharing nothing."""

from __future__ import annotations

import asyncio
import logging
import socket
from functools import partial
from typing import Any

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy.mode_servers import AsyncioServerInstance, ServerInstance

logger = logging.getLogger(__name__)


class ReusePort:
    """Declares `keyswap_reuse_port`; when set, this process's TCP listeners share their
    port with other processes that set it too."""

    def __init__(self) -> None:
        self._proxyserver: Any = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "keyswap_reuse_port",
            bool,
            False,
            "Listen with SO_REUSEPORT: several gateway processes started with it serve one "
            "address, and the kernel spreads connections between them.",
        )

    def configure(self, updated: set[str]) -> None:
        if "keyswap_reuse_port" not in updated or not ctx.options.keyswap_reuse_port:
            return
        if not hasattr(socket, "SO_REUSEPORT"):
            raise exceptions.OptionsError("keyswap_reuse_port: this platform has no SO_REUSEPORT")
        proxyserver = ctx.master.addons.get("proxyserver")
        if proxyserver is not None and self._proxyserver is None:
            self._proxyserver = proxyserver
            # A weak reference to this bound method: the addon lives as long as the master.
            proxyserver.servers.changed.connect(self._servers_changed)

    def _servers_changed(self) -> None:
        """Sent with the new listeners made but not yet started."""
        if not ctx.options.keyswap_reuse_port:
            return
        for instance in self._proxyserver.servers:
            if shareable(instance) and not instance.is_running:
                instance.listen = partial(listen_reusing_port, instance)

    def running(self) -> None:
        if not ctx.options.keyswap_reuse_port or self._proxyserver is None:
            return
        missed = [
            instance.mode.full_spec
            for instance in self._proxyserver.servers
            if shareable(instance) and instance.is_running and "listen" not in vars(instance)
        ]
        if missed:  # an error logged at start-up makes mitmproxy exit 1
            logger.error(
                "keyswap: keyswap_reuse_port could not take effect: mitmproxy made %s before "
                "it loaded the gateway (it loads -s scripts once its listeners are up). Run "
                "`keyswap serve ... -- --set keyswap_reuse_port=true` (mitmdump, with the "
                "option in place before it binds) or `keyswap serve --workers N`",
                ", ".join(missed),
            )


def shareable(instance: ServerInstance[Any]) -> bool:
    """A TCP listener on a port of its own: what SO_REUSEPORT can share."""
    return isinstance(instance, AsyncioServerInstance) and instance.mode.transport_protocol == "tcp"


async def listen_reusing_port(
    instance: AsyncioServerInstance[Any], host: str, port: int
) -> list[Any]:  # as mitmproxy's: asyncio servers (and UDP ones, never made here)
    """mitmproxy's AsyncioServerInstance.listen for a TCP mode, with SO_REUSEPORT."""
    if port == 0:  # a port picked at random is shared with nobody: mitmproxy's own way
        return await AsyncioServerInstance.listen(instance, host, port)
    return [await asyncio.start_server(instance.handle_stream, host, port, reuse_port=True)]
