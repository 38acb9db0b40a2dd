"""keyswap's benchmark: throughput and latency side by side, in one run, as ratios.

  upstream  nginx serving a small JSON document (its own req/s shows the headroom)
  A         bare `mitmdump --mode reverse:` to that upstream (the platform's ceiling)
  B         keyswap: several proxies, bearer swap, header filtering, the activity log on
  C         nginx as a reverse proxy that sets the same header (the physical reference)

Rounds alternate A B C A B C ... so machine noise hits all of them. Then the workers
phase: `keyswap serve --workers 2` (W2) against `--workers 1` (W1) and A at saturation,
in alternating rounds, with wrk on the same cores as the gateways (on a 2-core machine
the workers and wrk share 2 cores). Then streaming through B: peak RSS growth for one
large download and one large upload, and the time to the first event of a server-sent
event stream. Then the backends phase: keyswap (`serve --workers 1`) on PostgreSQL
(`--db postgresql://...`, a throwaway cluster started the way the tests start theirs)
against keyswap on its SQLite default, paired like B/A; skipped, saying so, when
PostgreSQL is not installed. Results: bench/results.json and a table. `--only workers`
and `--only backends` run one of those phases alone; so does `--only async` (the accept
rate of `Prefer: respond-async` requests against synchronous ones, and the delivery
rate of queued requests with `--workers 1` and 2), and `--only forward` (forward mode:
keyswap's forward listener against its reverse one and against bare `mitmdump --mode
regular`, over HTTP and HTTPS, and what TLS interception costs per new connection and
per request; see `forward_phase`). Run it with scripts/bench (which installs wrk and
nginx when it can).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TOKEN = "ks_bench" + "0" * 37  # and one digit: proxy appI's token (ks_ and 43 characters)
BODY = json.dumps({"id": 42, "name": "keyswap bench", "items": list(range(20))}).encode()


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


class Proc:
    """A started process on a port, stopped by the ExitStack."""

    def __init__(
        self,
        stack: ExitStack,
        cmd: list[str],
        port: int,
        log: Path,
        env: dict[str, str] | None = None,
    ):
        self.port = port
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        stack.callback(self.stop)
        wait_port(port, self.proc)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0


def nginx(stack: ExitStack, work: Path, name: str, server: str, listen: str = "") -> Proc:
    """nginx with one server (`listen`: options after the address, e.g. " ssl")."""
    port = free_port()
    folder = work / name
    folder.mkdir()
    conf = folder / "nginx.conf"
    conf.write_text(
        f"daemon off;\nworker_processes 1;\npid {folder}/nginx.pid;\n"
        f"error_log {folder}/error.log;\n"
        "events { worker_connections 4096; }\n"
        f"http {{\n access_log off;\n client_body_temp_path {folder};\n proxy_temp_path {folder};\n"
        f" fastcgi_temp_path {folder};\n uwsgi_temp_path {folder};\n scgi_temp_path {folder};\n"
        f" keepalive_requests 1000000;\n server {{\n  listen 127.0.0.1:{port}{listen};\n"
        f"{server}\n }}\n}}\n"
    )
    return Proc(
        stack, ["nginx", "-c", str(conf), "-e", str(folder / "error.log")], port, folder / "out.log"
    )


WRK_LATENCY = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)


def wrk(
    url: str, connections: int, seconds: float, headers: dict[str, str], proxy: int | None = None
) -> dict[str, float]:
    """wrk on `url`; with `proxy` (a port on loopback), through that HTTP proxy: wrk cannot
    use one, so it connects to the proxy and a Lua line makes its request line the
    absolute form (`GET http://host:port/path`), with the URL's Host header."""
    cmd = [
        "wrk",
        "-t",
        "1",
        "-c",
        str(connections),
        "-d",
        f"{max(seconds, 1):.0f}s",
        "--latency",
        "--timeout",
        "10s",
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        if proxy is not None:
            script.write(f"wrk.path = {json.dumps(url)}\n")  # a JSON string is a Lua string
            script.flush()
            cmd += ["-s", script.name]
            headers = {"Host": urlsplit(url).netloc, **headers}
            url = f"http://127.0.0.1:{proxy}/"
        for k, v in headers.items():
            cmd += ["-H", f"{k}: {v}"]
        out = subprocess.run(
            [*cmd, url], capture_output=True, text=True, timeout=seconds + 60, check=True
        ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    latency = {f"p{p}_ms": float(v) * scale[u] for p, v, u in WRK_LATENCY.findall(out)}
    return {
        "rps": rps,
        "requests": total,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": sum(map(int, errors.groups())) if errors else 0,
        **latency,
    }


def clean_wrk(
    name: str, proc: Proc, path: str, c: int, seconds: float, headers: dict[str, str]
) -> dict[str, float]:
    """A wrk run on one of the setups; a failed request ends the benchmark."""
    return clean(name, wrk(f"http://127.0.0.1:{proc.port}{path}", c, seconds, headers))


def clean(name: str, run: dict[str, float]) -> dict[str, float]:
    """A load run's figures, once it saw no failed request (else the benchmark ends)."""
    if run["non_2xx"] or run["socket_errors"]:
        raise SystemExit(f"{name}: {run['non_2xx']} non-2xx, {run['socket_errors']} socket err")
    return run


def connect_load(
    proxy: int,
    url: str,
    connections: int,
    seconds: float,
    headers: dict[str, str],
    cafile: str | None = None,
    fresh: bool = False,
) -> dict[str, float]:
    """The bench's own forward-proxy client, for what wrk cannot do (a CONNECT tunnel):
    `connections` connections to the proxy on loopback port `proxy`, each sending GET
    `url` in a loop, HTTP/1.1 kept alive, as wrk does. For an https URL each connection
    is a CONNECT tunnel with TLS inside (the proxy's certificate verified against
    `cafile`, no session resumption); for an http one, absolute-form requests. `fresh`:
    a new connection (CONNECT and handshake) for every request, `Connection: close`.
    Kept-alive connections are opened before the clock starts. Figures as wrk's; run it
    in a process of its own, as wrk is one (`tunnels` does)."""
    return asyncio.run(_connect_load(proxy, url, connections, seconds, headers, cafile, fresh))


async def _connect_load(
    proxy: int,
    url: str,
    connections: int,
    seconds: float,
    headers: dict[str, str],
    cafile: str | None,
    fresh: bool,
) -> dict[str, float]:
    parts = urlsplit(url)
    tls = ssl.create_default_context(cafile=cafile) if parts.scheme == "https" else None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"GET {target if tls else url} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{k}: {v}" for k, v in headers.items()] + (["Connection: close"] if fresh else [])
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    tally = {"requests": 0, "non_2xx": 0, "socket_errors": 0}
    latencies: list[float] = []

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy)
        if tls is not None:
            writer.write(
                f"CONNECT {parts.netloc} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if head.split(None, 2)[1] != b"200":
                raise ConnectionError(head.split(b"\r\n")[0].decode())
            await writer.start_tls(tls, server_hostname=parts.hostname)
        return reader, writer

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        writer.write(request)
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        if length := re.search(rb"\r\ncontent-length:\s*(\d+)", head):
            await reader.readexactly(int(length.group(1)))
        elif b"\r\ntransfer-encoding: chunked" in head:
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await reader.readexactly(size + 2)
            await reader.readuntil(b"\r\n")  # no trailers
        else:
            raise ConnectionError("a response without a length")
        return int(head.split(None, 2)[1])

    async def client(stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
        while (started := time.perf_counter()) < deadline:
            try:
                stream = stream or await connect()
                status = await exchange(*stream)
            except (OSError, EOFError, ValueError, IndexError, asyncio.IncompleteReadError):
                tally["socket_errors"] += 1
                status = 0
            if fresh or not status:
                if stream:
                    stream[1].close()
                stream = None
            ended = time.perf_counter()
            if ended < deadline and status:
                tally["requests"] += 1
                tally["non_2xx"] += not 200 <= status < 400
                latencies.append((ended - started) * 1000)
        if stream:
            stream[1].close()

    streams = [None] * connections if fresh else [await connect() for _ in range(connections)]
    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(client(stream) for stream in streams))
    latencies.sort()
    quantile = {
        p: latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] for p in (50, 99)
    }
    return {
        "rps": tally["requests"] / seconds,
        **tally,
        **({f"p{p}_ms": ms for p, ms in quantile.items()} if latencies else {}),
    }


def keyswap_config(work: Path, upstream: int, secure: tuple[int, Path] | None = None) -> Path:
    """Proxies app0 to app4 (route /api/appN, token TOKEN + N) to the upstream; with
    `secure` (an HTTPS upstream's port, and the CA that issued its certificate), app5 to
    that one."""
    targets = {"up": f'{{ base_url: "http://127.0.0.1:{upstream}", credential: up }}'}
    if secure is not None:
        port, ca = secure
        targets["secure"] = (
            f'{{ base_url: "https://127.0.0.1:{port}", credential: up, '
            f'tls: {{ ca_file: "{ca}" }} }}'
        )
    proxies = "\n".join(
        f"  app{i}:\n    target: {target}\n    routes: [/api/app{i}]\n    methods: [GET, POST]\n"
        f"    request_headers: {{ strip: [x-debug, cookie], set: {{ x-team: bench{i} }} }}\n"
        f"    response_headers: {{ strip: [server] }}\n"
        f"    tokens: [{{ id: t, sha256: {_digest(TOKEN + str(i))} }}]"
        for i, target in enumerate(["up"] * 5 + ["secure"] * (secure is not None))
    )
    path = work / "keyswap.yaml"
    path.write_text(
        'version: 1\ncredentials:\n  up: { type: bearer, token: "${env:BENCH_SECRET}" }\n'
        + "targets:\n"
        + "".join(f"  {name}: {spec}\n" for name, spec in targets.items())
        + f"proxies:\n{proxies}\n"
    )
    return path


def mitmdump(stack: ExitStack, work: Path, name: str, upstream: int, extra: list[str]) -> Proc:
    port = free_port()
    cmd = [str(BIN / "mitmdump"), "-q", "--mode", f"reverse:http://127.0.0.1:{upstream}@{port}"]
    cmd += ["--listen-host", "127.0.0.1", *extra]
    return Proc(stack, cmd, port, work / f"{name}.log", env={"BENCH_SECRET": "bench-target-secret"})


def keyswap(
    stack: ExitStack, work: Path, name: str, config: Path, db: Path, more: tuple[str, ...] = ()
) -> Proc:
    extra = ["-s", str(ROOT / "addons" / "gateway.py"), "--set", f"keyswap_config={config}"]
    extra += ["--set", f"keyswap_db={db}", *more]
    return mitmdump(stack, work, name, 9, extra)  # the reverse target is never used: keyswap routes


def forward_listener(ca: Path) -> tuple[int, tuple[str, ...]]:
    """A forward-mode listener (mitmproxy's `regular`) on a free port, signing with the
    CA that mitmproxy makes in the folder `ca`: its port and mitmdump arguments."""
    port = free_port()
    return port, ("--mode", f"regular@127.0.0.1:{port}", "--set", f"confdir={ca}")


def keyswap_serve(
    stack: ExitStack,
    work: Path,
    name: str,
    upstream: int,
    workers: int,
    db: str | None = None,
    extra: tuple[str, ...] = (),
) -> Proc:
    """`keyswap serve --workers N` (its own config; its own SQLite file unless `db` names
    another state database; `extra` mitmproxy options), once every worker answers."""
    folder = _sub(work, name)
    config = keyswap_config(folder, upstream)
    port = free_port()
    cmd = [str(BIN / "keyswap"), "serve", "--workers", str(workers), "--config", str(config)]
    cmd += ["--listen", f"127.0.0.1:{port}", "--db", db or str(folder / "keyswap.db")]
    cmd += ["--", "-q", *extra]
    proc = Proc(stack, cmd, port, work / f"{name}.log", env={"BENCH_SECRET": "bench-target-secret"})
    pids: set[int] = set()
    deadline = time.monotonic() + 60
    while len(pids) < workers:  # a probe per fresh connection: the kernel picks the worker
        if time.monotonic() > deadline:
            raise SystemExit(f"{name}: {len(pids)} of {workers} workers answer after 60 s")
        try:
            pids.add(httpx.get(f"http://127.0.0.1:{port}/_keyswap/health").json()["pid"])
        except httpx.TransportError:
            time.sleep(0.1)
    return proc


def workers_phase(
    stack: ExitStack, work: Path, bare: Proc, upstream: int, rounds: int, seconds: float, c: int
) -> dict[str, Any]:
    """W2 (`keyswap serve --workers 2`) against W1 (`--workers 1`) and A (bare mitmdump,
    one process) at saturation, alternating rounds. Nothing is pinned: wrk runs on the
    same cores as the gateways, as a client on the gateway's machine would, so W2/W1 is
    what a second worker adds on this machine, not what a second core would alone."""
    path, headers = "/api/app3/data.json", {"x-proxy-token": TOKEN + "3"}
    setups = {
        "A": (bare, "/data.json", {}),
        "W1": (keyswap_serve(stack, work, "W1", upstream, 1), path, headers),
        "W2": (keyswap_serve(stack, work, "W2", upstream, 2), path, headers),
    }
    rps: dict[str, list[float]] = {name: [] for name in setups}
    for proc, url_path, hdrs in setups.values():  # warm-up
        wrk(f"http://127.0.0.1:{proc.port}{url_path}", c, 1, hdrs)
    for _ in range(rounds):
        for name, (proc, url_path, hdrs) in setups.items():
            rps[name].append(clean_wrk(name, proc, url_path, c, seconds, hdrs)["rps"])
    for name in ("W1", "W2"):
        setups[name][0].stop()
    medians = {name: round(statistics.median(v), 1) for name, v in rps.items()}
    return {
        "connections": c,
        "cpus": len(os.sched_getaffinity(0)),
        "note": "wrk (1 thread) runs on the same cores as the gateways; nothing is pinned",
        "rounds": rps,
        "rps": medians,
        "W2/W1_rps": round(medians["W2"] / medians["W1"], 3),
        "W2/A_rps": round(medians["W2"] / medians["A"], 3),
    }


def backends_phase(work: Path, upstream: int, rounds: int, seconds: float) -> dict[str, Any]:
    """keyswap (`serve --workers 1`, as B) on PostgreSQL against keyswap on its SQLite
    default, paired (see `paired`). The cluster is the tests' throwaway one
    (tests/support/postgres.py), started off the gateways' CPU, as a database server on
    another machine would be: PG/SQLite is what the backend costs the gateway process.
    Without PostgreSQL, the phase says so and is skipped."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import psycopg

    from tests.support.postgres import have_postgres, start_postgres

    if not have_postgres():
        return {"skipped": "PostgreSQL is not installed (Debian package postgresql)"}
    path, headers = "/api/app3/data.json", {"x-proxy-token": TOKEN + "3"}
    everything, _, others = cpu_split()
    with ExitStack() as phase:  # closes the gateways, then the cluster
        os.sched_setaffinity(0, others)  # the cluster's processes inherit it
        try:
            cluster = start_postgres()
        finally:
            os.sched_setaffinity(0, everything)
        phase.callback(cluster.stop)
        url = cluster.create_database()
        setups = {
            "SQLite": (keyswap_serve(phase, work, "SQLite", upstream, 1), path, headers),
            "PG": (keyswap_serve(phase, work, "PG", upstream, 1, db=url), path, headers),
        }
        for proc, url_path, hdrs in setups.values():  # warm-up
            wrk(f"http://127.0.0.1:{proc.port}{url_path}", 16, 1, hdrs)
        pairing = paired(setups, rounds, seconds, base="SQLite", other="PG")
        for proc, _, _ in setups.values():
            proc.stop()  # a clean stop writes every queued row
        with psycopg.connect(url) as conn:
            pg_rows = int(conn.execute("select count(*) from requests").fetchone()[0])
    return pairing | {
        "connections": 16,
        "note": "both pinned to one CPU; wrk, the upstream and PostgreSQL on the others",
        "rows": {"SQLite": count_rows(work / "SQLite" / "keyswap.db"), "PG": pg_rows},
    }


def async_phase(
    stack: ExitStack, work: Path, upstream: int, rounds: int, seconds: float, queued: int
) -> dict[str, Any]:
    """Async requests. Accept: one keyswap (`serve --workers 1`, its deliveries off, so
    that only accepting is measured) answering `Prefer: respond-async` requests (stored,
    committed, 202) against the same requests answered synchronously, alternating rounds
    at 16 connections. Delivery: `queued` requests stored beforehand, then
    `serve --workers N` (1, then 2, each on a fresh SQLite file) delivers them to the
    upstream; the rate is from the first attempt's start to the last one's end, read
    from the activity log."""
    from keyswap.state import async_queue, migrations
    from keyswap.state.backends import open_backend
    from keyswap.state.store import iso, new_request_id, unix

    path, token = "/api/app3/data.json", {"x-proxy-token": TOKEN + "3"}
    prefer = token | {"prefer": "respond-async"}
    accepting = keyswap_serve(
        stack, work, "async-accept", upstream, 1, extra=("--set", "keyswap_async_concurrency=0")
    )
    for headers in (token, prefer):  # warm-up
        wrk(f"http://127.0.0.1:{accepting.port}{path}", 16, 1, headers)
    rps: dict[str, list[float]] = {"sync": [], "async": []}
    for _ in range(rounds):
        for name, headers in (("sync", token), ("async", prefer)):
            rps[name].append(clean_wrk(name, accepting, path, 16, seconds, headers)["rps"])
    accepting.stop()
    accept = {name: round(statistics.median(v), 1) for name, v in rps.items()}

    delivery: dict[str, Any] = {}
    for workers in (1, 2):
        name = f"async-deliver-w{workers}"
        db = _sub(work, name) / "deliver.db"
        with open_backend(str(db)) as backend:
            migrations.upgrade(backend)
            now = time.time()
            with backend.session() as session, session.transaction():
                for _ in range(queued):
                    async_queue.enqueue(
                        session,
                        id=new_request_id(),
                        proxy_id="app3",
                        token_id="t",  # noqa: S106 (the config's token id, not a secret)
                        token_sha256=_digest(TOKEN + "3"),
                        now=iso(now),
                        deadline_at=iso(now + 3600),
                        max_attempts=8,
                        idempotency_key="bench",
                        accepted_request_id="",
                        method="GET",
                        path=path,
                        headers=[],
                        body=b"",
                    )
        gateway = keyswap_serve(stack, work, name, upstream, workers, db=str(db))
        deadline = time.monotonic() + 600
        conn = sqlite3.connect(db)
        try:
            while time.monotonic() < deadline:
                [(left,)] = conn.execute(
                    "select count(*) from async_requests where state in ('queued', 'delivering')"
                ).fetchall()
                if left == 0:
                    break
                time.sleep(0.5)
            gateway.stop()  # a clean stop writes every row
            states = dict(conn.execute("select state, count(*) from async_requests group by 1"))
            times = conn.execute(
                "select started_at, duration_ms from requests where attempts >= 1"
            ).fetchall()
        finally:
            conn.close()
        first = min(unix(started) for started, _ in times)
        last = max(unix(started) + (ms or 0) / 1000 for started, ms in times)
        delivery[f"W{workers}"] = {
            "queued": queued,
            "states": states,
            "attempts": len(times),
            "seconds": round(last - first, 2),
            "per_s": round(len(times) / (last - first), 1),
        }
    return {
        "connections": 16,
        "accept_rps": accept,
        "rounds": rps,
        "async/sync_rps": round(accept["async"] / accept["sync"], 3),
        "delivery": delivery,
        "delivery_W2/W1": round(delivery["W2"]["per_s"] / delivery["W1"]["per_s"], 3),
        "note": "nothing pinned; wrk, nginx and the gateways share the machine's cores",
    }


FORWARD_PAIRS = {  # ratio: what is compared, then its two sides as (load, server)
    "forward/reverse_http": (
        "HTTP, keyswap forward vs reverse listener (wrk)",
        ("forward_http", "keyswap"),
        ("reverse_http", "keyswap2"),
    ),
    "forward/bare_http": (
        "HTTP, keyswap forward vs bare mitmdump (wrk)",
        ("forward_http", "keyswap"),
        ("forward_http", "bare"),
    ),
    "forward/bare_https": (
        "HTTPS kept alive, keyswap vs bare mitmdump",
        ("forward_https", "keyswap"),
        ("forward_https", "bare"),
    ),
    "forward/bare_https_new_connection": (
        "HTTPS, a new connection per request, keyswap vs bare",
        ("forward_https_fresh", "keyswap"),
        ("forward_https_fresh", "bare"),
    ),
    "https/http_forward": (
        "keyswap forward kept alive, HTTPS vs HTTP",
        ("forward_https", "keyswap"),
        ("forward_http_client", "keyswap2"),
    ),
}


def forward_phase(
    stack: ExitStack, work: Path, upstream: int, rounds: int, seconds: float
) -> dict[str, Any]:
    """Forward (intercepting) mode, every ratio paired (`paired_loads`) at 16 connections.
    Two keyswap processes with one config, each with a reverse listener and a forward
    listener (mitmproxy's `regular`), so that two of keyswap's ways can be paired; bare
    `mitmdump --mode regular` is the platform's ceiling. The targets: the plain upstream,
    and an nginx TLS server on loopback with a certificate from a CA made here (trustme)
    that keyswap's target and the bare mitmdump both verify against. Loads:

      reverse_http         wrk on keyswap's reverse listener (/api/app3/...)
      forward_http         wrk through the forward listener, absolute-form requests
      forward_https        `connect_load`: CONNECT, TLS, then requests kept alive
      forward_http_client  `connect_load`, absolute-form HTTP (HTTPS/HTTP with one client)
      forward_https_fresh  `connect_load`, a new CONNECT and TLS handshake per request

    A new connection through the proxy is a CONNECT, two TLS handshakes (client to
    proxy, proxy to target) and a request. The `*_ms` figures are proxy CPU time per
    request from paired throughput (each side has half of one CPU: 500/rps ms). Rounds
    last at least 2 s, as a new connection per request takes about half a second at
    saturation."""
    import trustme

    folder = _sub(work, "forward")
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(target_ca := folder / "target-ca.pem"))
    issued = authority.issue_cert("127.0.0.1")
    issued.private_key_and_cert_chain_pem.write_to_path(str(pem := folder / "target.pem"))
    secure = nginx(
        stack,
        work,
        "secure",
        f"  ssl_certificate {pem};\n  ssl_certificate_key {pem};\n"
        f"  location / {{ root {work}; default_type application/json; }}",
        listen=" ssl",
    )
    config = keyswap_config(folder, upstream, (secure.port, target_ca))
    plain = f"http://127.0.0.1:{upstream}/data.json"
    tls = f"https://127.0.0.1:{secure.port}/data.json"
    c = 16
    seconds = max(seconds, 2)

    def server(proc: Proc, port: int, ca: Path, token: bool) -> dict[str, Any]:
        """One side's loads: `proc` with its forward listener on `port`."""
        http_token = {"x-proxy-token": TOKEN + "3"} if token else {}
        tls_token = {"x-proxy-token": TOKEN + "5"} if token else {}
        cafile = str(ca / "mitmproxy-ca-cert.pem")
        reverse = f"http://127.0.0.1:{proc.port}/api/app3/data.json"  # keyswap's only
        return {
            "proc": proc,
            "reverse_http": functools.partial(wrk, reverse, c, headers=http_token),
            "forward_http": functools.partial(wrk, plain, c, headers=http_token, proxy=port),
            "forward_https": tunnels(port, tls, c, tls_token, cafile),
            "forward_http_client": tunnels(port, plain, c, http_token),
            "forward_https_fresh": tunnels(port, tls, c, tls_token, cafile, fresh=True),
        }

    servers = {}
    for name in ("keyswap", "keyswap2"):  # the second one finds the first one's CA
        port, listener = forward_listener(folder / "keyswap-ca")
        gateway = keyswap(stack, work, name, config, folder / f"{name}.db", listener)
        wait_port(port, gateway.proc)
        servers[name] = server(gateway, port, folder / "keyswap-ca", token=True)
    port, listener = forward_listener(folder / "bare-ca")
    cmd = [str(BIN / "mitmdump"), "-q", *listener]
    cmd += ["--set", f"ssl_verify_upstream_trusted_ca={target_ca}"]
    bare = Proc(stack, cmd, port, work / "forward-bare.log")
    servers["bare"] = server(bare, port, folder / "bare-ca", token=False)
    for side in servers.values():  # warm-up: connections, certificates, caches
        for load in ("forward_http", "forward_https", "forward_https_fresh"):
            clean(load, side[load](1))
    pairs: dict[str, Any] = {}
    for key, (_, (a, on_a), (b, on_b)) in FORWARD_PAIRS.items():
        names = (f"{on_a} {a}", f"{on_b} {b}")
        loads = {names[0]: (servers[on_a]["proc"], servers[on_a][a])}
        loads[names[1]] = (servers[on_b]["proc"], servers[on_b][b])
        pairing = paired_loads(loads, rounds, seconds, base=names[1], other=names[0])
        pairs[key] = {  # the ratio's numerator first
            "rps": {n: round(statistics.median(pairing["rps"][n]), 1) for n in names},
            "ratio": pairing[f"{names[0]}/{names[1]}_rps"],
            "rounds": pairing["rounds"],
            "cpu": pairing["cpu"],
        }
    for side in servers.values():
        side["proc"].stop()

    def ms(key: str, side: int) -> float:  # proxy CPU ms per request, half a CPU each
        return 500 / float(list(pairs[key]["rps"].values())[side])

    fresh, kept = "forward/bare_https_new_connection", "forward/bare_https"
    return {
        "connections": c,
        "pairs": pairs,
        **{key: pair["ratio"] for key, pair in pairs.items()},
        "new_connection_ms": {
            "keyswap": round(ms(fresh, 0) - ms(kept, 0), 2),
            "bare": round(ms(fresh, 1) - ms(kept, 1), 2),
        },
        "tls_ms_per_request": round(ms("https/http_forward", 0) - ms("https/http_forward", 1), 2),
        "note": "paired: both servers of a pair pinned to one CPU, wrk, connect_load and "
        "nginx on the other; req/s are each side's with half of that CPU",
    }


def tunnels(
    proxy: int,
    url: str,
    c: int,
    headers: dict[str, str],
    ca: str | None = None,
    fresh: bool = False,
) -> Callable[[float], dict[str, float]]:
    """`connect_load` as a load (seconds -> figures), each run in a process of its own
    (spawned, so it inherits this process's CPUs when it starts, as wrk does)."""

    def load(seconds: float) -> dict[str, float]:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as client:
            return client.submit(connect_load, proxy, url, c, seconds, headers, ca, fresh).result()

    return load


def cpu_split() -> tuple[set[int], int, set[int]]:
    """The paired phases' CPUs: all of them, the one the paired gateways share, the others."""
    everything = os.sched_getaffinity(0)
    cpu = max(everything)
    return everything, cpu, everything - {cpu} or everything


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process to these CPUs."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cpus)


def paired(
    setups: dict[str, tuple[Proc, str, dict[str, str]]],
    rounds: int,
    seconds: float,
    base: str = "A",
    other: str = "B",
) -> dict[str, Any]:
    """`paired_loads` with wrk at 16 connections on two of the setups."""
    return paired_loads(
        {
            name: (
                proc,
                functools.partial(wrk, f"http://127.0.0.1:{proc.port}{path}", 16, headers=h),
            )
            for name, (proc, path, h) in setups.items()
        },
        rounds,
        seconds,
        base,
        other,
    )


def paired_loads(
    loads: dict[str, tuple[Proc, Callable[[float], dict[str, float]]]],
    rounds: int,
    seconds: float,
    base: str = "A",
    other: str = "B",
) -> dict[str, Any]:
    """`base` and `other` (A and B: a server, and a load on it) loaded at the same time,
    both servers pinned to one CPU (the clients and nginx on the others): the scheduler
    shares that CPU evenly, so other/base throughput is their cost ratio, and drift or a
    noisy neighbour slows both alike. The alternating rounds measure each alone; this
    pairing is the figure that holds still on a shared box. A failed request ends the
    benchmark."""
    everything, cpu, others = cpu_split()
    names = (base, other)
    os.sched_setaffinity(0, others)  # wrk (or the client's process) inherits it
    for name in names:
        pin(loads[name][0].proc.pid, {cpu})
    ratios = []
    rps: dict[str, list[float]] = {name: [] for name in names}

    def load(name: str, runs: dict[str, dict[str, float]]) -> None:
        runs[name] = loads[name][1](seconds)

    try:
        for _ in range(rounds):
            runs: dict[str, dict[str, float]] = {}
            threads = [threading.Thread(target=load, args=(n, runs)) for n in names]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for name in names:
                run = runs.get(name)
                if run is None or run["non_2xx"] or run["socket_errors"]:
                    raise SystemExit(f"{name} (paired): the load failed or saw errors: {run}")
                rps[name].append(run["rps"])
            ratios.append(round(runs[other]["rps"] / runs[base]["rps"], 3))
    finally:
        os.sched_setaffinity(0, everything)
        for name in names:
            pin(loads[name][0].proc.pid, everything)
    return {
        "cpu": cpu,
        "rounds": ratios,
        "rps": rps,
        f"{other}/{base}_rps": statistics.median(ratios),
    }


def log_check(gateway: Proc, db: Path, url: str, headers: dict[str, str], n: int) -> dict[str, int]:
    """Exactly n requests at saturation (16 clients), then a clean stop: every one of
    them must have its activity log row. wrk cannot say how many requests the gateway
    received (it leaves some in flight), so this phase counts for itself."""
    rows_before = settled_rows(db)
    sent = 0
    lock = threading.Lock()

    def client(share: int) -> None:
        nonlocal sent
        with httpx.Client(timeout=30) as c:
            for _ in range(share):
                c.get(url, headers=headers).raise_for_status()
                with lock:
                    sent += 1

    threads = [threading.Thread(target=client, args=(n // 16 + (i < n % 16),)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gateway.stop()  # a clean stop writes every queued row
    return {"requests_sent": sent, "rows_recorded": count_rows(db) - rows_before}


def count_rows(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("select count(*) from requests").fetchone()[0])
    finally:
        conn.close()


def settled_rows(db: Path) -> int:
    """The row count once the gateway's writer has caught up (no traffic meanwhile)."""
    previous = -1
    for _ in range(100):
        rows = count_rows(db)
        if rows == previous:
            return rows
        previous = rows
        time.sleep(0.3)
    raise SystemExit("the activity log did not settle")


def stream_figures(stack: ExitStack, work: Path, mib: int) -> dict[str, float]:
    """Peak RSS growth of keyswap for one large download and upload; SSE first event."""
    echo_port = free_port()
    Proc(
        stack,
        [sys.executable, str(ROOT / "scripts" / "echo_target.py"), "--port", str(echo_port)],
        echo_port,
        work / "echo.log",
    )
    config = keyswap_config(_sub(work, "stream"), echo_port)
    gateway = keyswap(stack, work, "stream", config, work / "stream" / "keyswap.db")
    url = f"http://127.0.0.1:{gateway.port}/api/app0"
    headers = {"x-proxy-token": TOKEN + "0"}
    size = mib * 1024 * 1024
    out: dict[str, float] = {}
    before = gateway.status_kib("VmRSS")
    with httpx.stream("GET", f"{url}/bytes/{size}", headers=headers, timeout=600) as r:
        got = sum(len(c) for c in r.iter_raw(1 << 20))
    assert got == size, (got, size)
    out["download_rss_growth_mib"] = (gateway.status_kib("VmHWM") - before) / 1024
    before = max(gateway.status_kib("VmHWM"), gateway.status_kib("VmRSS"))
    block = b"u" * (1 << 20)
    r = httpx.post(
        f"{url}/count",
        headers={**headers, "content-length": str(size)},
        content=(block for _ in range(mib)),
        timeout=600,
    )
    assert r.json()["bytes"] == size
    out["upload_rss_growth_mib"] = max(0, gateway.status_kib("VmHWM") - before) / 1024
    started = time.perf_counter()
    with httpx.stream("GET", f"{url}/sse?events=3&gap=0.5", headers=headers, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                out["sse_first_event_s"] = time.perf_counter() - started
                break
    out["stream_mib"] = mib
    return out


def _sub(work: Path, name: str) -> Path:
    folder = work / name
    folder.mkdir(exist_ok=True)
    return folder


def versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (done.stdout or done.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "unknown"

    import mitmproxy.version

    return {
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "nginx": first_line(["nginx", "-v"]),
        "wrk": first_line(["wrk", "--version"]),
        "keyswap": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or "unknown",
    }


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(int(mem) / 1024 / 1024, 1),
        "kernel": platform.release(),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="short runs, small streams (a smoke test)")
    p.add_argument("--duration", type=float, help="seconds per measurement [quick 1, full 10]")
    p.add_argument("--rounds", type=int, help="A/B/C rounds [quick 1, full 3]")
    p.add_argument(
        "--stream-mib", type=int, help="size of the streamed bodies [quick 32, full 1024]"
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    p.add_argument(
        "--only",
        choices=["workers", "backends", "async", "forward"],
        help="run one phase alone: workers (keyswap serve --workers 2 vs 1 vs bare mitmdump), "
        "backends (keyswap on PostgreSQL vs on SQLite, paired), async (respond-async accept "
        "rate vs synchronous, delivery rate with 1 and 2 workers), forward (forward mode vs "
        "reverse mode and vs bare mitmdump --mode regular, HTTP and HTTPS, and TLS "
        "interception per new connection and per request)",
    )
    args = p.parse_args()
    duration = args.duration or (1 if args.quick else 10)
    rounds = args.rounds or (1 if args.quick else 3)
    stream_mib = args.stream_mib or (32 if args.quick else 1024)
    connections = [1, 16] if args.quick else [1, 16, 64]

    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="keyswap-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        doc = work / "data.json"
        doc.write_bytes(BODY)
        upstream = nginx(
            stack,
            work,
            "upstream",
            f"  location / {{ root {work}; default_type application/json; }}",
        )
        if args.only == "backends":
            backends = backends_phase(work, upstream.port, rounds, duration)
            settings = {"duration_s": duration, "rounds": rounds, "only": "backends"}
            write(args.out, stamped(args.quick, settings) | {"backends": backends})
            print(render_backends(backends))
            print(f"\nresults: {args.out}")
            return
        queued = 500 if args.quick else 5000
        if args.only == "async":
            async_figures = async_phase(stack, work, upstream.port, rounds, duration, queued)
            settings = {"duration_s": duration, "rounds": rounds, "only": "async"}
            write(args.out, stamped(args.quick, settings) | {"async": async_figures})
            print(render_async(async_figures))
            print(f"\nresults: {args.out}")
            return
        if args.only == "forward":
            forward = forward_phase(stack, work, upstream.port, rounds, duration)
            settings = {"duration_s": duration, "rounds": rounds, "only": "forward"}
            write(args.out, stamped(args.quick, settings) | {"forward": forward})
            print(render_forward(forward))
            print(f"\nresults: {args.out}")
            return
        bare = mitmdump(stack, work, "A", upstream.port, [])
        if args.only == "workers":
            workers = workers_phase(
                stack, work, bare, upstream.port, rounds, duration, max(connections)
            )
            settings = {"duration_s": duration, "rounds": rounds, "only": "workers"}
            write(args.out, stamped(args.quick, settings) | {"workers": workers})
            print(render_workers(workers))
            print(f"\nresults: {args.out}")
            return
        config = keyswap_config(_sub(work, "b"), upstream.port)
        db = work / "b" / "keyswap.db"
        setups = {
            "A": (bare, "/data.json", {}),
            "B": (
                keyswap(stack, work, "B", config, db),
                "/api/app3/data.json",
                {"x-proxy-token": TOKEN + "3"},
            ),
            "C": (
                nginx(
                    stack,
                    work,
                    "C",
                    f"  location / {{ proxy_pass http://127.0.0.1:{upstream.port}; "
                    'proxy_http_version 1.1; proxy_set_header Connection ""; '
                    'proxy_set_header Authorization "Bearer bench-target-secret"; }',
                ),
                "/data.json",
                {},
            ),
        }
        upstream_rps = wrk(f"http://127.0.0.1:{upstream.port}/data.json", 16, duration, {})["rps"]
        results: dict[str, dict[str, Any]] = {
            name: {"rps": {str(c): [] for c in connections}, "latency_1": []} for name in setups
        }
        for proc, path, headers in setups.values():  # warm-up
            wrk(f"http://127.0.0.1:{proc.port}{path}", 4, 1, headers)
        for _ in range(rounds):
            for c in connections:
                for name, (proc, path, headers) in setups.items():
                    run = clean_wrk(name, proc, path, c, duration, headers)
                    results[name]["rps"][str(c)].append(run["rps"])
                    if c == 1:
                        results[name]["latency_1"].append(
                            {k: run[k] for k in ("p50_ms", "p99_ms") if k in run}
                        )
        for name, (proc, _, _) in setups.items():
            results[name]["peak_rss_mib"] = round(proc.status_kib("VmHWM") / 1024, 1)
        pairing = paired(setups, rounds, duration)
        workers = workers_phase(
            stack, work, bare, upstream.port, rounds, duration, max(connections)
        )
        backends = backends_phase(work, upstream.port, rounds, duration)
        async_figures = async_phase(stack, work, upstream.port, rounds, duration, queued)
        forward = forward_phase(stack, work, upstream.port, rounds, duration)
        gateway, path, headers = setups["B"]
        log = log_check(
            gateway,
            db,
            f"http://127.0.0.1:{gateway.port}{path}",
            headers,
            500 if args.quick else 5000,
        )
        summary = summarize(results, connections)
        streaming = stream_figures(stack, work, stream_mib)

    settings = {
        "duration_s": duration,
        "rounds": rounds,
        "connections": connections,
        "stream_mib": stream_mib,
    }
    report = stamped(args.quick, settings) | {
        "upstream_rps": upstream_rps,
        "runs": summary,
        "ratios": {
            f"B/A_rps_c{c}": round(summary["B"]["rps"][str(c)] / summary["A"]["rps"][str(c)], 3)
            for c in connections
        }
        | {
            "B/A_rps_paired_c16": pairing["B/A_rps"],
            "B-A_p99_ms_c1": round(summary["B"]["p99_ms"] - summary["A"]["p99_ms"], 3),
            f"W2/W1_rps_c{workers['connections']}": workers["W2/W1_rps"],
            f"W2/A_rps_c{workers['connections']}": workers["W2/A_rps"],
            "async/sync_accept_rps_c16": async_figures["async/sync_rps"],
            "async_delivery_W2/W1": async_figures["delivery_W2/W1"],
        }
        | {f"{k}_rps_paired_c{forward['connections']}": forward[k] for k in FORWARD_PAIRS}
        | (
            {"PG/SQLite_rps_paired": backends["PG/SQLite_rps"]} if "skipped" not in backends else {}
        ),
        "paired": pairing,
        "workers": workers,
        "backends": backends,
        "async": async_figures,
        "forward": forward,
        "log": log,
        "streaming": {k: round(v, 3) for k, v in streaming.items()},
    }
    top = str(max(connections))
    report["goals"] = {
        "B/A throughput >= 0.90 at saturation": report["ratios"][f"B/A_rps_c{top}"] >= 0.90,
        "B p99 <= A p99 + 1 ms at 1 connection": report["ratios"]["B-A_p99_ms_c1"] <= 1.0,
        "rows recorded == requests sent": log["rows_recorded"] == log["requests_sent"],
        "streaming RSS growth <= 64 MiB": max(
            streaming["download_rss_growth_mib"], streaming["upload_rss_growth_mib"]
        )
        <= 64,
    }
    if "skipped" not in backends:
        report["goals"]["PG/SQLite throughput >= 0.95 (paired)"] = backends["PG/SQLite_rps"] >= 0.95
    write(args.out, report)
    print(render(report))
    print(f"\nresults: {args.out}")


def stamped(quick: bool, settings: dict[str, Any]) -> dict[str, Any]:
    """What every report starts with: when, how, on what."""
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "quick" if quick else "full",
        "machine": machine(),
        "versions": versions(),
        "settings": settings,
    }


def write(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def summarize(
    results: dict[str, dict[str, Any]], connections: list[int]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        out[name] = {
            "rps": {str(c): round(statistics.median(r["rps"][str(c)]), 1) for c in connections},
            "p50_ms": round(statistics.median(x["p50_ms"] for x in r["latency_1"]), 3),
            "p99_ms": round(statistics.median(x["p99_ms"] for x in r["latency_1"]), 3),
            "peak_rss_mib": r.get("peak_rss_mib"),
        }
    return out


def render(report: dict[str, Any]) -> str:
    conns = report["settings"]["connections"]
    head = ["", *(f"req/s c={c}" for c in conns), "p50 ms c=1", "p99 ms c=1", "peak RSS MiB"]
    labels = {"A": "A bare mitmdump", "B": "B keyswap", "C": "C nginx proxy"}
    rows = [head]
    for name, r in report["runs"].items():
        rows.append(
            [
                labels[name],
                *(f"{r['rps'][str(c)]:.0f}" for c in conns),
                f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.2f}",
                f"{r['peak_rss_mib']}",
            ]
        )
    lines = table(rows)
    lines.append(f"upstream nginx alone: {report['upstream_rps']:.0f} req/s (c=16)")
    lines.append("ratios: " + ", ".join(f"{k} {v}" for k, v in report["ratios"].items()))
    lines.append(render_workers(report["workers"]))
    lines.append(render_backends(report["backends"]))
    lines.append(render_async(report["async"]))
    lines.append(render_forward(report["forward"]))
    lines.append(
        f"activity log: {report['log']['rows_recorded']} rows for "
        f"{report['log']['requests_sent']} requests"
    )
    s = report["streaming"]
    lines.append(
        f"streaming {s['stream_mib']} MiB: download +{s['download_rss_growth_mib']:.1f} MiB RSS, "
        f"upload +{s['upload_rss_growth_mib']:.1f} MiB RSS; "
        f"SSE first event {s['sse_first_event_s'] * 1000:.0f} ms"
    )
    lines += [
        f"goal {'met    ' if ok else 'NOT met'}  {goal}" for goal, ok in report["goals"].items()
    ]
    return "\n".join(lines)


def table(rows: list[list[str]]) -> list[str]:
    """Rows of cells as lines of left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]


def render_forward(f: dict[str, Any]) -> str:
    rows = [[f"forward mode (paired, c={f['connections']})", "req/s", "against", "ratio", "rounds"]]
    for key, (what, _, _) in FORWARD_PAIRS.items():
        pair = f["pairs"][key]
        a, b = pair["rps"].values()
        rows.append([what, f"{a:.0f}", f"{b:.0f}", f"{pair['ratio']}", str(pair["rounds"])])
    n = f["new_connection_ms"]
    return "\n".join(
        [
            *table(rows),
            f"a new CONNECT + TLS connection costs keyswap {n['keyswap']} ms, bare mitmdump "
            f"{n['bare']} ms beyond a kept-alive request; TLS costs keyswap "
            f"{f['tls_ms_per_request']} ms per kept-alive request (proxy CPU time: 500/rps, "
            "each side of a pair having half a CPU); HTTPS with connect_load, the bench's "
            "CONNECT client",
        ]
    )


def render_workers(w: dict[str, Any]) -> str:
    r = w["rps"]
    return (
        f"workers (c={w['connections']}, wrk on the same {w['cpus']} cores): "
        f"W2 keyswap --workers 2 {r['W2']:.0f} req/s, W1 --workers 1 {r['W1']:.0f}, "
        f"A bare mitmdump {r['A']:.0f}; W2/W1 {w['W2/W1_rps']}, W2/A {w['W2/A_rps']}"
    )


def render_async(a: dict[str, Any]) -> str:
    r, d = a["accept_rps"], a["delivery"]
    return (
        f"async (c={a['connections']}): respond-async accepted {r['async']:.0f} req/s against "
        f"{r['sync']:.0f} synchronous, async/sync {a['async/sync_rps']}; delivery of "
        f"{d['W1']['queued']} queued: --workers 1 {d['W1']['per_s']:.0f}/s, --workers 2 "
        f"{d['W2']['per_s']:.0f}/s, W2/W1 {a['delivery_W2/W1']}"
    )


def render_backends(b: dict[str, Any]) -> str:
    if "skipped" in b:
        return f"backends: skipped: {b['skipped']}"
    r = {name: statistics.median(v) for name, v in b["rps"].items()}
    return (
        f"backends (paired, c={b['connections']} each, both on CPU {b['cpu']}): keyswap on "
        f"PostgreSQL {r['PG']:.0f} req/s, on SQLite {r['SQLite']:.0f}; PG/SQLite "
        f"{b['PG/SQLite_rps']} (rounds {', '.join(map(str, b['rounds']))}); rows logged "
        f"{b['rows']['PG']} and {b['rows']['SQLite']}"
    )


if __name__ == "__main__":
    if not shutil.which("wrk") or not shutil.which("nginx"):
        raise SystemExit(
            "scripts/bench.py needs wrk and nginx; run scripts/bench, which installs them"
        )
    main()
