"""A local OAuth2 authorization server and protected API, for the tests (run as a process).

POST /token          client_credentials or refresh_token grants; rotates refresh tokens,
                     refuses a spent one with invalid_grant (and remembers that it was tried)
ANY  /api/...        needs `Authorization: Bearer <live access token>`, else 401;
                     answers JSON {method, path, body} (+ token under /api/echo)
POST /admin/mode     body: ok | down | invalid_grant | garbage   (how /token behaves)
POST /admin/hold     the next /token request waits, unprocessed, until /admin/release
POST /admin/release  processes the held request now (with the state as it is then)
POST /admin/expire   every access token issued so far stops working
GET  /admin/stats    {token_calls, grants, spent_reused, refresh_tokens_seen}
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs


class State:
    def __init__(self, client_id: str, client_secret: str, refresh: str, expires_in: int) -> None:
        self.lock = threading.Lock()
        self.client = (client_id, client_secret)
        self.refresh = refresh
        self.spent: set[str] = set()
        self.live: set[str] = set()
        self.expires_in = expires_in
        self.mode = "ok"
        self.hold = False
        self.held = threading.Event()  # a /token request is waiting
        self.release = threading.Event()
        self.n = 0
        self.stats: dict[str, object] = {
            "token_calls": 0,
            "grants": [],
            "spent_reused": [],
            "refresh_tokens_seen": [],
        }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: State

    def log_message(self, format: str, *args: object) -> None:
        pass

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def send(self, code: int, data: object) -> None:
        raw = json.dumps(data).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        self.route()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def route(self) -> None:
        s = self.state
        body = self.body()
        if self.path == "/token":
            self.token(body)
        elif self.path == "/admin/mode":
            with s.lock:
                s.mode = body.decode()
            self.send(200, {"mode": s.mode})
        elif self.path == "/admin/hold":
            with s.lock:
                s.hold = True
                s.held.clear()
                s.release.clear()
            self.send(200, {})
        elif self.path == "/admin/release":
            waiting = s.held.wait(10)
            s.release.set()
            self.send(200 if waiting else 409, {"held": waiting})
        elif self.path == "/admin/expire":
            with s.lock:
                s.live.clear()
            self.send(200, {})
        elif self.path == "/admin/stats":
            with s.lock:
                self.send(200, s.stats)
        elif self.path.startswith("/api/"):
            auth = self.headers.get("authorization", "")
            token = auth.removeprefix("Bearer ")
            with s.lock:
                ok = token in s.live
            if not ok:
                self.send(401, {"error": "expired or unknown token"})
            else:
                answer = {"method": self.command, "path": self.path, "body": body.decode()}
                if self.path.startswith("/api/echo"):
                    answer["token"] = token  # only where a test asks to see it
                self.send(200, answer)
        else:
            self.send(404, {})

    def token(self, body: bytes) -> None:
        s = self.state
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        with s.lock:
            held, s.hold = s.hold, False
        if held:  # only this request: the next ones are served at once
            s.held.set()
            s.release.wait(60)
        with s.lock:
            s.stats["token_calls"] += 1  # type: ignore[operator]
            mode = s.mode
        if mode == "down":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == "garbage":
            self.send_response(200)
            self.send_header("content-length", "9")
            self.end_headers()
            self.wfile.write(b"<garbage>")
            return
        client = (form.get("client_id"), form.get("client_secret"))
        if "authorization" in self.headers:
            pair = base64.b64decode(self.headers["authorization"].split()[1]).decode()
            client = tuple(pair.split(":", 1))  # type: ignore[assignment]
        if client != s.client:
            self.send(401, {"error": "invalid_client"})
            return
        with s.lock:
            if mode == "invalid_grant":
                self.send(400, {"error": "invalid_grant"})
                return
            grant = form.get("grant_type")
            s.stats["grants"].append(grant)  # type: ignore[attr-defined]
            if grant == "refresh_token":
                presented = form.get("refresh_token", "")
                s.stats["refresh_tokens_seen"].append(presented)  # type: ignore[attr-defined]
                if presented in s.spent:
                    s.stats["spent_reused"].append(presented)  # type: ignore[attr-defined]
                if presented != s.refresh:
                    self.send(400, {"error": "invalid_grant"})
                    return
                s.spent.add(presented)
                s.n += 1
                s.refresh = f"rt-{s.n}-rotated"
            s.n += 1
            access = f"at-{s.n}-access"
            s.live.add(access)
            answer = {"access_token": access, "token_type": "Bearer", "expires_in": s.expires_in}
            if grant == "refresh_token":
                answer["refresh_token"] = s.refresh
        self.send(200, answer)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--client-id", default="keyswap")
    p.add_argument("--client-secret", required=True)
    p.add_argument("--refresh-token", required=True)
    p.add_argument("--expires-in", type=int, default=3600)
    args = p.parse_args()
    Handler.state = State(args.client_id, args.client_secret, args.refresh_token, args.expires_in)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
