"""End to end: connections to targets. Targets at one address keep their own TLS settings
(no connection made for one is used for another), and a failed connection is reported
to the client by the target's name and the kind of failure, never by its address."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keyswap.config.tokens import digest, new_token
from tests.support import token_for
from tests.support.processes import Gateway, Process, free_port, start_echo_target, start_gateway

pytestmark = pytest.mark.e2e

TARGET_SECRET = "connections-target-secret-3c9a"
PROXIES = ("insecure", "strict", "pinned", "dead")


def self_signed(path: Path) -> None:
    """A certificate for localhost signed by its own key (cert and key in one PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@dataclass
class World:
    gateway: Gateway
    tls_echo: Process
    dead_port: int
    token: str
    db: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("connections")
    pem = tmp / "self-signed.pem"
    self_signed(pem)
    tls_echo = start_echo_target(tmp, pem, pem)
    dead = free_port()
    token = new_token()
    origin = f"https://localhost:{tls_echo.port}"
    proxies = "".join(
        f"  {name}: {{ target: {name}, tokens: [{{ id: t, sha256: {digest(token_for(token, name))} }}] }}\n"
        for name in PROXIES
    )
    config = tmp / "keyswap.yaml"
    config.write_text(
        f"""\
version: 1
credentials:
  k: {{ type: bearer, token: "${{env:TARGET_SECRET}}" }}
targets:
  # three targets at one address, each with its own TLS settings
  insecure: {{ base_url: "{origin}", credential: k, tls: {{ verify: false }} }}
  strict:   {{ base_url: "{origin}", credential: k }}
  pinned:   {{ base_url: "{origin}", credential: k, tls: {{ ca_file: "{pem}" }} }}
  dead:     {{ base_url: "http://127.0.0.1:{dead}", credential: k }}
proxies:
{proxies}"""
    )
    db = tmp / "keyswap.db"
    gateway = start_gateway(config, tmp, env={"TARGET_SECRET": TARGET_SECRET}, db=db)
    yield World(gateway, tls_echo, dead, token, db)
    gateway.stop()
    tls_echo.stop()


class Client:
    """One keep-alive client connection to the gateway, which must stay the one."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.conn = http.client.HTTPConnection("127.0.0.1", world.gateway.port, timeout=30)
        self.local: set[tuple[str, int]] = set()

    def get(self, proxy: str, path: str = "/anything") -> tuple[int, dict[str, str], bytes]:
        headers = {"x-proxy-token": token_for(self.world.token, proxy)}
        self.conn.request("GET", f"/api/{proxy}{path}", headers=headers)
        response = self.conn.getresponse()
        body = response.read()
        assert self.conn.sock is not None, "the gateway closed the client connection"
        self.local.add(self.conn.sock.getsockname())
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body

    def close(self) -> None:
        self.conn.close()
        assert len(self.local) == 1, f"more than one client connection: {self.local}"


def assert_no_address(text: str, *ports: int) -> None:
    assert "127.0.0.1" not in text and "localhost" not in text, text
    for port in ports:
        assert str(port) not in text, text


@pytest.mark.parametrize(
    "order",
    [
        ("insecure", "strict", "pinned"),
        ("strict", "insecure", "pinned"),
        ("pinned", "strict", "insecure"),
    ],
)
def test_targets_at_one_address_keep_their_own_tls_settings(
    world: World, order: tuple[str, ...]
) -> None:
    # One client connection, the targets alternating twice: a server connection made
    # for one target (verified or not, failed or not) is never used for another.
    client = Client(world)
    try:
        for _ in range(2):
            for proxy in order:
                status, headers, body = client.get(proxy)
                if proxy == "strict":
                    assert status == 502, body
                    assert headers["keyswap-proxy-code"] == "proxy-error"
                    problem = json.loads(body)
                    assert problem["type"] == "urn:keyswap:problem:unreachable"
                    assert problem["detail"].startswith("target 'strict' failed: TLS:")
                    assert "certificate not trusted" in problem["detail"]
                    assert headers["keyswap-proxy-message"] == problem["detail"]
                    assert_no_address(problem["detail"], world.tls_echo.port)
                else:
                    assert status == 200, body
                    assert headers["keyswap-proxy-code"] == "proxy-access-granted"
                    seen = json.loads(body)["headers"]
                    assert seen["authorization"] == f"Bearer {TARGET_SECRET}"
    finally:
        client.close()


def rows(db: Path, request_id: str) -> list[dict[str, object]]:
    """The activity log row of a request, once the writer has flushed it."""
    deadline = time.monotonic() + 10
    while True:
        conn = sqlite3.connect(db)
        conn.row_factory = sqlite3.Row
        try:
            found = [
                dict(r) for r in conn.execute("select * from requests where id = ?", [request_id])
            ]
        except sqlite3.OperationalError:
            found = []  # the table is not there yet
        finally:
            conn.close()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_refused_connection_names_the_target_not_its_address(world: World) -> None:
    client = Client(world)
    try:
        status, headers, body = client.get("dead", "/x")
        # and the client connection is still good for the next request
        assert client.get("insecure")[0] == 200
    finally:
        client.close()
    assert status == 502
    problem = json.loads(body)
    assert problem["type"] == "urn:keyswap:problem:unreachable"
    assert problem["detail"] == "target 'dead' failed: connection refused"
    assert headers["keyswap-proxy-message"] == problem["detail"]
    assert_no_address(body.decode() + headers["keyswap-proxy-message"], world.dead_port)
    # The activity log keeps the detail for the operator.
    (row,) = rows(world.db, headers["keyswap-request-id"])
    assert row["message"] == problem["detail"]
    error = str(row["error"])
    assert "Connect call failed" in error and str(world.dead_port) in error


def test_untrusted_certificate_detail_is_logged(world: World) -> None:
    client = Client(world)
    try:
        status, headers, _ = client.get("strict")
    finally:
        client.close()
    assert status == 502
    (row,) = rows(world.db, headers["keyswap-request-id"])
    assert "Certificate verify failed" in str(row["error"])
