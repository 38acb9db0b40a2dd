"""`keyswap serve`'s listeners: reverse mode at --listen, forward mode at --forward (alone
or beside it), signing with keyswap's CA. The arguments it gives mitmdump are checked
against mitmproxy itself: its mode parser, its listeners (shared between workers with
SO_REUSEPORT) and its certificate store."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.addons.tlsconfig import TlsConfig
from mitmproxy.proxy.mode_specs import ProxyMode, RegularMode, ReverseMode
from mitmproxy.test import taddons

from keyswap.cli.main import main
from keyswap.cli.serve import gateway_script, serve_args
from keyswap.forward import ca
from keyswap.gateway.reuse_port import ReusePort
from tests.support import ROOT
from tests.support.processes import free_port

CA_DIR = Path("/srv/keyswap/keyswap-ca")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The demo config in a folder of its own (keyswap's CA is made beside it)."""
    path = tmp_path / "keyswap.yaml"
    path.write_text((ROOT / "config" / "demo.yaml").read_text())
    return path


def test_listen_alone_is_reverse_mode() -> None:
    assert serve_args("k.yaml", "127.0.0.1:8080", "k.db", ("--set", "flow_detail=0")) == [
        "-s", str(gateway_script()),
        "--mode", "reverse:http://unused.invalid@8080", "--listen-host", "127.0.0.1",
        "--set", "keyswap_config=k.yaml",
        "--set", "keyswap_db=k.db",
        "--set", "connection_strategy=lazy",
        "--set", "flow_detail=0",
    ]  # fmt: skip


def test_forward_alone_is_mitmproxys_regular_mode_with_keyswaps_ca() -> None:
    args = serve_args("k.yaml", None, "k.db", (), forward=("127.0.0.1:8081", CA_DIR))
    assert args == [
        "-s", str(gateway_script()),
        "--mode", "regular@127.0.0.1:8081", "--set", f"confdir={CA_DIR}",
        "--set", "keyswap_config=k.yaml",
        "--set", "keyswap_db=k.db",
        "--set", "connection_strategy=lazy",
    ]  # fmt: skip


def test_both_with_workers() -> None:
    args = serve_args("k.yaml", "0.0.0.0:8080", "k.db", (), 2, ("0.0.0.0:8081", CA_DIR))
    assert args[2:9] == [
        "--mode", "reverse:http://unused.invalid@8080", "--listen-host", "0.0.0.0",
        "--mode", "regular@0.0.0.0:8081", "--set",
    ]  # fmt: skip
    assert args[-2:] == ["--set", "keyswap_reuse_port=true"]


@pytest.mark.parametrize(
    ("forward", "host", "port"),
    [
        ("127.0.0.1:8081", "127.0.0.1", 8081),
        ("8081", "127.0.0.1", 8081),  # a port alone: loopback, as --listen
        ("[::1]:8081", "::1", 8081),
        ("0.0.0.0:8081", "0.0.0.0", 8081),
    ],
)
def test_mitmproxy_reads_the_forward_address_as_given(forward: str, host: str, port: int) -> None:
    args = serve_args("k.yaml", None, None, (), forward=(forward, CA_DIR))
    mode = ProxyMode.parse(args[args.index("--mode") + 1])
    assert isinstance(mode, RegularMode)
    assert (mode.listen_host(), mode.listen_port()) == (host, port)


def reusing_port(port: int) -> None:
    """Listen on the port with SO_REUSEPORT, as another worker does."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))
        other.listen()


def test_with_workers_both_listeners_share_their_ports() -> None:
    """keyswap_reuse_port applies to every TCP listener: forward mode's is shared between
    the workers like reverse mode's."""
    reverse, forward = free_port(), free_port()
    args = serve_args(
        "k.yaml", f"127.0.0.1:{reverse}", None, (), 2, (f"127.0.0.1:{forward}", CA_DIR)
    )
    modes = [args[i + 1] for i, arg in enumerate(args) if arg == "--mode"]
    assert "keyswap_reuse_port=true" in args

    async def run() -> None:
        proxyserver, addon = Proxyserver(), ReusePort()
        with taddons.context(proxyserver, addon) as tctx:
            tctx.configure(proxyserver, listen_host="127.0.0.1")
            tctx.configure(addon, keyswap_reuse_port=True)
            tctx.configure(proxyserver, mode=modes)
            assert await proxyserver.setup_servers()
            try:
                kinds = {type(s.mode) for s in proxyserver.servers}
                assert kinds == {ReverseMode, RegularMode}
                reusing_port(reverse)
                reusing_port(forward)
            finally:
                await proxyserver.servers.update([])

    asyncio.run(run())


def test_mitmproxy_signs_with_keyswaps_ca(tmp_path: Path) -> None:
    made = ca.ensure(tmp_path / "keyswap-ca")
    args = serve_args("k.yaml", None, None, (), forward=("8081", made.folder))
    confdir = args[args.index("--set", args.index("--mode")) + 1].removeprefix("confdir=")
    addon = TlsConfig()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, confdir=confdir)
        store = addon.certstore
    ca_cert = x509.load_pem_x509_certificate(made.pem)
    assert store.default_ca.fingerprint() == ca_cert.fingerprint(hashes.SHA256())
    leaf = store.get_cert("api.openai.com", [x509.DNSName("api.openai.com")]).cert
    leaf.to_cryptography().verify_directly_issued_by(ca_cert)


def test_cli_errors_come_before_anything_starts(config: Path) -> None:
    def serve(*args: str) -> str:
        done = CliRunner().invoke(main, ["serve", "--config", str(config), *args])
        assert done.exit_code == 2, done.output
        return done.output

    assert "--ca-dir names forward mode's CA" in serve("--ca-dir", "x")
    assert "mitmweb's UI listens on port 8081 too" in serve("--web", "--forward", "8081")
    assert "set confdir with keyswap serve's --ca-dir" in serve(
        "--forward", "127.0.0.1:8082", "--", "--set", "confdir=/tmp"
    )
    assert "Invalid value for --forward: 'junk' is not HOST:PORT" in serve("--forward", "junk")
    assert not (config.parent / "keyswap-ca").exists()  # no CA made for a failed start
