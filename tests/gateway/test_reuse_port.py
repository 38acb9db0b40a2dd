import asyncio
import errno
import logging
import socket

import pytest
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons

from keyswap.gateway.reuse_port import ReusePort
from tests.support.processes import free_port


def another_listener(port: int) -> None:
    """Listen on the port with SO_REUSEPORT, as a second gateway process would."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))
        other.listen()


def serve(*, reuse_port: bool, configured_late: bool = False) -> None:
    async def run() -> None:
        proxyserver, addon = Proxyserver(), ReusePort()
        port = free_port()
        with taddons.context(proxyserver, addon) as tctx:
            tctx.configure(proxyserver, listen_host="127.0.0.1")
            tctx.configure(proxyserver, mode=[f"reverse:http://unused.invalid@{port}"])
            if not configured_late:
                tctx.configure(addon, keyswap_reuse_port=reuse_port)
            assert await proxyserver.setup_servers()
            try:
                if configured_late:  # as under plain `mitmdump -s`: the script comes later
                    tctx.configure(addon, keyswap_reuse_port=reuse_port)
                    addon.running()
                another_listener(port)
            finally:
                await proxyserver.servers.update([])

    asyncio.run(run())


def test_the_listener_shares_its_port_with_the_option() -> None:
    serve(reuse_port=True)


def test_without_it_the_port_is_its_own() -> None:
    with pytest.raises(OSError) as e:
        serve(reuse_port=False)
    assert e.value.errno == errno.EADDRINUSE


def test_set_after_the_listeners_are_up_it_stops_the_gateway_with_a_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR), pytest.raises(OSError):
        serve(reuse_port=True, configured_late=True)
    assert "keyswap_reuse_port could not take effect" in caplog.text
    assert "keyswap serve" in caplog.text
