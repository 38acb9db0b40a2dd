#!/usr/bin/env python3
"""A local target API for the demo and the tests: it answers with what it received.

  GET  /anything            -> 200 JSON {method, path, query, headers, body}
  GET  /status/<code>       -> that status, JSON body
  GET  /bytes/<n>           -> n bytes of 'x', streamed (content-length set)
  POST /count               -> reads the body without keeping it: {bytes, sha256}
  GET  /sse?events=N&gap=S  -> text/event-stream, one event every S seconds
  GET  /slow?s=S            -> waits S seconds, then answers
  GET  /close-mid-body      -> promises 1000 bytes, sends 10, closes
  GET  /ws (WebSocket)      -> echoes one text message back with the request's headers

Usage: echo_target.py [--host 127.0.0.1] [--port 9911] [--cert F --key F]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import socket
import ssl
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

CHUNK = 256 * 1024


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "echo-target/1"

    def log_message(self, format: str, *args: object) -> None:
        if self.server.verbose:  # type: ignore[attr-defined]
            sys.stderr.write(f"echo-target: {format % args}\n")

    def do_GET(self) -> None:
        self.dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def dispatch(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if self.headers.get("upgrade", "").lower() == "websocket":
            self.websocket_echo()
        elif url.path.startswith("/status/"):
            self.read_body()
            code = int(url.path.rsplit("/", 1)[1])
            self.send_json(code, {"status": code})
        elif url.path.startswith("/bytes/"):
            self.read_body()
            self.send_bytes(int(url.path.rsplit("/", 1)[1]))
        elif url.path == "/count":
            self.count_body()
        elif url.path == "/sse":
            self.send_events(
                int(query.get("events", ["3"])[0]), float(query.get("gap", ["0.5"])[0])
            )
        elif url.path == "/slow":
            time.sleep(float(query.get("s", ["5"])[0]))
            self.send_json(200, {"slow": True})
        elif url.path == "/close-mid-body":
            self.send_response(200)
            self.send_header("content-length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            body = self.read_body()
            self.send_json(
                200,
                {
                    "method": self.command,
                    "path": url.path,
                    "query": url.query,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body.decode("utf-8", "replace"),
                },
            )

    def read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            return b"".join(self.chunks())
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def chunks(self):  # type: ignore[no-untyped-def]
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return
            yield self.rfile.read(size)
            self.rfile.readline()

    def count_body(self) -> None:
        digest, total = hashlib.sha256(), 0
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            for chunk in self.chunks():
                digest.update(chunk)
                total += len(chunk)
        else:
            left = int(self.headers.get("content-length") or 0)
            while left:
                chunk = self.rfile.read(min(CHUNK, left))
                if not chunk:
                    break
                digest.update(chunk)
                total += len(chunk)
                left -= len(chunk)
        self.send_json(200, {"bytes": total, "sha256": digest.hexdigest()})

    def websocket_echo(self) -> None:
        key = self.headers["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        self.send_response(101)
        self.send_header("upgrade", "websocket")
        self.send_header("connection", "Upgrade")
        accept = base64.b64encode(hashlib.sha1(key.encode()).digest()).decode()  # noqa: S324
        self.send_header("sec-websocket-accept", accept)
        self.end_headers()
        self.wfile.flush()
        head = self.rfile.read(2)
        length = head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(self.rfile.read(2), "big")
        mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
        reply = json.dumps({"message": data.decode(), "headers": dict(self.headers.items())})
        payload = reply.encode()
        size = b"\x7e" + len(payload).to_bytes(2, "big")  # always the 16-bit form: simple to read
        self.wfile.write(b"\x81" + size + payload)
        self.wfile.flush()
        self.close_connection = True

    def send_json(self, code: int, data: object) -> None:
        body = json.dumps(data).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_bytes(self, n: int) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/octet-stream")
        self.send_header("content-length", str(n))
        self.end_headers()
        block = b"x" * CHUNK
        while n > 0:
            self.wfile.write(block[: min(n, CHUNK)])
            n -= CHUNK

    def send_events(self, events: int, gap: float) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i in range(events):
            data = f"id: {i}\ndata: event {i} at {time.time():.3f}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            time.sleep(gap)
        self.wfile.write(b"0\r\n\r\n")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    verbose = False


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9911)
    parser.add_argument("--cert", help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--key", help="PEM private key for --cert")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if ":" in args.host:
        Server.address_family = socket.AF_INET6
    server = Server((args.host, args.port), Handler)
    server.verbose = args.verbose
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    scheme = "https" if args.cert else "http"
    print(f"echo-target listening on {scheme}://{args.host}:{server.server_address[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
