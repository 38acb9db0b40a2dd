"""A target whose answers follow a script, for the async delivery tests: a loopback
HTTP/1.1 server on threads of its own that notes every request reaching it (time,
method, path, headers, body) and answers each with the next step of its script:

- `"200"` (or any status): that status, with the request's body echoed back;
- `"drop"`: closes the connection without an answer;
- `"429:1"` / `"503:2"`: that status with `Retry-After` seconds;
- `"sleep:S"`: waits S seconds, then answers 200 (`"sleep:S:503"`: then that status);
- `"echo"`: 200 with the request's headers as JSON (a target that echoes the credential);
  `"echo-gzip"`: the same, gzip-compressed (`Content-Encoding: gzip`); `"echo-chunked"`:
  the same, chunked in pieces of 5 bytes (so that a secret spans several);
  `"echo-gzip-chunked"`: gzip-compressed, then chunked so;
- `"hold"`: waits until `gate` is set (at most a minute), then answers 200.

When the script runs out, `default` answers. It also notes deliveries that overlap: two
requests with the same Idempotency-Key being answered at the same time."""

from __future__ import annotations

import gzip
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Arrival:
    at: float  # time.monotonic()
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    ended: float | None = None
    step: str = ""  # the script's step that answered it

    @property
    def status(self) -> int | None:
        """The status it was answered (or, the connection being gone, sent) with."""
        return status_of(self.step)


def status_of(step: str) -> int | None:
    """The status a step answers with; None for `drop`."""
    if step == "drop":
        return None
    if step in ("echo", "echo-gzip", "echo-chunked", "echo-gzip-chunked", "hold"):
        return 200
    if step.startswith("sleep:"):
        parts = step.split(":")
        return int(parts[2]) if len(parts) > 2 else 200
    return int(step.split(":")[0])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Dozens of gateway connections at once: with the default listen backlog (5) the
    # kernel drops SYNs and a connect waits for the retransmission (1 s, then 3 s),
    # past a short connect_timeout_s.
    request_queue_size = 256


@dataclass
class FlakyTarget:
    script: list[str] = field(default_factory=list)
    default: str = "200"
    host: str = "127.0.0.1"
    tls: ssl.SSLContext | None = None  # HTTPS with this server context

    def __post_init__(self) -> None:
        self.arrivals: list[Arrival] = []
        self.overlaps: list[str] = []  # idempotency keys delivered twice at once
        self.lock = threading.Lock()
        self.gate = threading.Event()  # what `hold` waits for
        self._in_flight: dict[str, int] = {}
        target = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                arrival = Arrival(
                    time.monotonic(),
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                key = arrival.headers.get("idempotency-key", "")
                with target.lock:
                    target.arrivals.append(arrival)
                    step = target.script.pop(0) if target.script else target.default
                    arrival.step = step
                    target._in_flight[key] = target._in_flight.get(key, 0) + 1
                    if key and target._in_flight[key] > 1:
                        target.overlaps.append(key)
                try:
                    self.answer(step, body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client is gone (a killed gateway)
                finally:
                    with target.lock:
                        target._in_flight[key] -= 1
                        arrival.ended = time.monotonic()

            def answer(self, step: str, body: bytes) -> None:
                if step == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                status, retry_after = step, None
                encoding = None
                if step in ("echo", "echo-gzip", "echo-chunked", "echo-gzip-chunked"):
                    body = json.dumps(dict(self.headers.items())).encode()
                    status = "200"
                    if step in ("echo-gzip", "echo-gzip-chunked"):
                        body, encoding = gzip.compress(body), "gzip"
                elif step == "hold":
                    target.gate.wait(60)
                    status = "200"
                elif step.startswith("sleep:"):
                    time.sleep(float(step.split(":")[1]))
                    status = str(status_of(step))
                elif ":" in step:
                    status, retry_after = step.split(":")
                if step.endswith("-chunked"):
                    self.chunked(body, encoding)
                    return
                self.send_response(int(status))
                if retry_after is not None:
                    self.send_header("retry-after", retry_after)
                self.send_header("content-type", "application/octet-stream")
                if encoding:
                    self.send_header("content-encoding", encoding)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def chunked(self, body: bytes, encoding: str | None) -> None:
                self.send_response(200)
                self.send_header("content-type", "application/json")
                if encoding:
                    self.send_header("content-encoding", encoding)
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for i in range(0, len(body), 5):
                    self.wfile.write(
                        b"5\r\n" if len(body) - i >= 5 else b"%x\r\n" % (len(body) - i)
                    )
                    self.wfile.write(body[i : i + 5] + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_one

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = _Server((self.host, 0), Handler)
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
