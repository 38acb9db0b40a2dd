"""Real processes for end-to-end tests: the gateway, the echo target, on loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import ROOT

BIN = Path(sys.executable).parent
ECHO_TARGET = ROOT / "scripts" / "echo_target.py"
GATEWAY_SCRIPT = ROOT / "addons" / "gateway.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} within {timeout}s")


@dataclass
class Process:
    """A started process with its output captured to a file."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def peak_rss_kib(self) -> int:
        return _status_kib(self.proc.pid, "VmHWM")

    def rss_kib(self) -> int:
        return _status_kib(self.proc.pid, "VmRSS")


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def start(cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> Process:
    with log.open("wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=ROOT
        )
    process = Process(proc, port, log)
    try:
        wait_for_port(port, proc)
    except Exception:
        process.stop()
        raise RuntimeError(f"{cmd[0]} did not start:\n{process.output()}") from None
    return process


def start_echo_target(tmp: Path, cert: Path | None = None, key: Path | None = None) -> Process:
    port = free_port()
    cmd = [sys.executable, str(ECHO_TARGET), "--port", str(port)]
    if cert and key:
        cmd += ["--cert", str(cert), "--key", str(key)]
    return start(cmd, port, tmp / f"echo-{port}.log")


@dataclass
class Gateway(Process):
    config: Path = field(default=Path())


def start_gateway(
    config: Path,
    tmp: Path,
    *,
    plain_mitmdump: bool = False,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
    db: Path | str | None = None,
) -> Gateway:
    """The gateway, via `keyswap serve` or, with plain_mitmdump, `mitmdump -s`; `db` is
    the state database, a file (default: a new one in `tmp`) or a PostgreSQL URL."""
    port = free_port()
    db = db or tmp / f"keyswap-{port}.db"
    if plain_mitmdump:
        cmd = [
            str(BIN / "mitmdump"),
            "-s",
            str(GATEWAY_SCRIPT),
            "--mode",
            f"reverse:http://unused.invalid@{port}",
            "--listen-host",
            "127.0.0.1",
            "--set",
            f"keyswap_config={config}",
            "--set",
            f"keyswap_db={db}",
            *(extra or []),
        ]
    else:
        cmd = [str(BIN / "keyswap"), "serve", "--config", str(config)]
        cmd += ["--listen", f"127.0.0.1:{port}", "--db", str(db)]
        if extra:
            cmd += ["--", *extra]
    p = start(cmd, port, tmp / f"gateway-{port}.log", env)
    return Gateway(p.proc, p.port, p.log, config)
