"""A target that notes when each request reaches it, for tests that count what a
gateway let through: a loopback HTTP/1.1 server (keep-alive) on threads of its own,
answering every request `200 ok`."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class CountingTarget:
    """`arrivals` holds the monotonic time of each request, in order of arrival."""

    def __init__(self) -> None:
        arrivals: list[float] = []
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with lock:
                    arrivals.append(time.monotonic())
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.arrivals = arrivals
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def most_within(self, seconds: float) -> int:
        """The most requests that arrived within any `seconds` (a sliding window)."""
        times = sorted(self.arrivals)
        most, first = 0, 0
        for last, at in enumerate(times):
            while at - times[first] >= seconds:
                first += 1
            most = max(most, last - first + 1)
        return most

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
