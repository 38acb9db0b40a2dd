"""A target that records every byte it receives, for tests that must show what a
hostile request did (or did not) deliver. It answers each request head it finds with
`200 ok`, reading a body by Content-Length or chunked framing, as a plain HTTP/1.1
server would; what arrived stays in `received`, one bytes object per connection."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


class RawTarget:
    """A loopback TCP server on its own thread; `received` is what each connection sent."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.received: list[bytearray] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def everything(self) -> bytes:
        return b"".join(bytes(r) for r in self.received)

    def clear(self) -> None:
        self.received.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            buf = bytearray()
            self.received.append(buf)
            threading.Thread(target=self._serve, args=(conn, buf), daemon=True).start()

    def _serve(self, conn: socket.socket, buf: bytearray) -> None:
        conn.settimeout(10)
        pending = b""
        with conn:
            try:
                while not self._stop.is_set():
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                    pending += data
                    while (answered := _one_request(pending)) is not None:
                        pending = pending[answered:]
                        conn.sendall(ANSWER)
            except OSError:
                return


def _one_request(data: bytes) -> int | None:
    """The length of the first complete request in `data`, or None."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[:end].lower()
    body = end + 4
    if b"transfer-encoding: chunked" in head:
        pos = body
        while True:
            line_end = data.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(data[pos:line_end].split(b";")[0] or b"0", 16)
            pos = line_end + 2
            if size == 0:
                trailer_end = data.find(b"\r\n\r\n", pos - 2)
                return None if trailer_end < 0 else trailer_end + 4
            pos += size + 2
            if pos > len(data):
                return None
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
            return body + length if len(data) >= body + length else None
    return body


@contextmanager
def raw_target() -> Iterator[RawTarget]:
    target = RawTarget()
    try:
        yield target
    finally:
        target.close()
