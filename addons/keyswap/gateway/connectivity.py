"""`keyswap test-upstream`: the "Test connection" button of an upstream proxy.

Connects through the proxy the way the gateway does (absolute form for a plain-HTTP URL
behind an http proxy, a CONNECT tunnel otherwise) and reports each step, so a failure
says which one: TCP to the proxy, TLS to the proxy, proxy authentication, CONNECT or
request, response from the far side."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from keyswap.config.model import TargetTls, UpstreamProxy
from keyswap.gateway.stages.upstream import proxy_authorization
from keyswap.net.urls import hostport

TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Step:
    """One step of the test: what was tried, whether it worked, and what was seen."""

    name: str
    ok: bool
    detail: str
    ms: float


class StepFailed(Exception):
    """A step reached its peer but got an answer that means failure."""


def _context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _TlsInTls:
    """TLS inside an existing TLS connection (target through an https proxy): the
    standard library cannot wrap an SSLSocket again, so this pumps an SSLObject."""

    def __init__(self, outer: socket.socket, context: ssl.SSLContext, host: str) -> None:
        self.outer = outer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=host)
        self._retry(self.tls.do_handshake)

    def _retry(self, action: Callable[[], object]) -> object:
        while True:
            try:
                result = action()
            except ssl.SSLWantReadError:
                self._flush()
                data = self.outer.recv(65536)
                if not data:
                    raise StepFailed("the connection closed during TLS") from None
                self.incoming.write(data)
            else:
                self._flush()
                return result

    def _flush(self) -> None:
        if pending := self.outgoing.read():
            self.outer.sendall(pending)

    def version(self) -> str | None:
        return self.tls.version()

    def sendall(self, data: bytes) -> None:
        self._retry(lambda: self.tls.write(data))

    def recv(self, size: int) -> bytes:
        data = self._retry(lambda: self.tls.read(size))
        assert isinstance(data, bytes)
        return data

    def close(self) -> None:
        self.outer.close()


Conn = socket.socket | _TlsInTls


def _read_head(sock: Conn) -> tuple[int, str]:
    """The status code and status line of an HTTP/1 response head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise StepFailed("the connection closed before a response")
        data += chunk
        if len(data) > 65536:
            raise StepFailed("the response head is larger than 64 KiB")
    line = data.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise StepFailed(f"not an HTTP response: {line[:80]!r}")
    return int(parts[1]), line


class ProxyCheck:
    """Fetches one URL through one upstream proxy, step by step."""

    def __init__(self, proxy: UpstreamProxy, url: str, target_tls: TargetTls | None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"'{url}' is not an http(s) URL")
        self.proxy, self.url, self.scheme = proxy, url, parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.target_tls = target_tls or TargetTls()
        self.auth = proxy_authorization(proxy)
        self.absolute = parts.scheme == "http" and proxy.type == "http"
        self.sock: Conn | None = None
        self.answer = (0, "")

    def steps(self) -> Iterator[Step]:
        """Run the steps in order; stop at the first that fails."""
        plan: list[tuple[str, Callable[[], str]]] = [("TCP to the proxy", self.tcp)]
        if self.proxy.type == "https":
            plan.append(("TLS to the proxy", self.proxy_tls))
        plan.append(("proxy authentication" if self.auth else "proxy accepts", self.ask))
        if self.scheme == "https":
            plan.append((f"TLS to {self.host}", self.tls_to_target))
        plan.append(("response from the far side", self.far_side))
        try:
            for name, action in plan:
                started = time.perf_counter()
                try:
                    step = Step(name, True, action(), 0)
                except (StepFailed, OSError) as e:
                    step = Step(name, False, str(e) or type(e).__name__, 0)
                ms = (time.perf_counter() - started) * 1000
                yield Step(step.name, step.ok, step.detail, ms)
                if not step.ok:
                    return
        finally:
            if self.sock is not None:
                self.sock.close()

    @property
    def authority(self) -> str:
        return hostport(self.host, self.port)

    def tcp(self) -> str:
        address = (self.proxy.host, self.proxy.port)
        self.sock = socket.create_connection(address, timeout=TIMEOUT_S)
        return f"connected to {hostport(*address)}"

    def proxy_tls(self) -> str:
        assert isinstance(self.sock, socket.socket)
        tls = self.proxy.tls
        self.sock = _context(tls.verify, tls.ca_file).wrap_socket(
            self.sock, server_hostname=self.proxy.host
        )
        return f"{self.sock.version()}, certificate {'verified' if tls.verify else 'not checked'}"

    def ask(self) -> str:
        """The CONNECT (or absolute-form request) that the proxy authenticates."""
        assert self.sock is not None
        auth = f"Proxy-Authorization: {self.auth}\r\n" if self.auth else ""
        if self.absolute:
            head = (
                f"GET {self.url} HTTP/1.1\r\nHost: {self.authority}\r\n{auth}Connection: close\r\n"
            )
        else:
            head = f"CONNECT {self.authority} HTTP/1.1\r\nHost: {self.authority}\r\n{auth}"
        self.sock.sendall((head + "\r\n").encode())
        self.answer = _read_head(self.sock)
        status, line = self.answer
        if status == 407:
            raise StepFailed(f"the proxy refused the credentials: {line}")
        if not self.absolute and not 200 <= status < 300:
            raise StepFailed(f"the proxy refused the CONNECT: {line}")
        return f"CONNECT {self.authority}: {line}" if not self.absolute else "request accepted"

    def tls_to_target(self) -> str:
        assert self.sock is not None
        tls = self.target_tls
        context = _context(tls.verify, tls.ca_file)
        if tls.client_cert:
            context.load_cert_chain(tls.client_cert)
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock = _TlsInTls(self.sock, context, self.host)
        else:
            assert isinstance(self.sock, socket.socket)
            self.sock = context.wrap_socket(self.sock, server_hostname=self.host)
        return f"{self.sock.version()}, certificate {'verified' if tls.verify else 'not checked'}"

    def far_side(self) -> str:
        assert self.sock is not None
        if not self.absolute:
            head = (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.authority}\r\nConnection: close\r\n\r\n"
            )
            self.sock.sendall(head.encode())
            self.answer = _read_head(self.sock)
        status, line = self.answer
        if status in (502, 503, 504):
            raise StepFailed(f"the proxy could not reach {self.authority}: {line}")
        return line
