"""End to end: managing proxies while a gateway serves the same config."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from keyswap.config.edit import ConfigEdit, lock_path
from keyswap.config.loader import load_config
from keyswap.config.tokens import digest, new_token
from tests.support.processes import BIN, start_echo_target, start_gateway

pytestmark = pytest.mark.e2e

TOKEN = re.compile(r"\(shown once, store it now\): (ks_[A-Za-z0-9_-]{43})")


ENV = {"ECHO_SECRET": "manage-secret"}


def command(config: Path, *args: str) -> list[str]:
    return [str(BIN / "keyswap"), *args, "--config", str(config)]


def environment(config: Path, db: Path | None = None) -> dict[str, str]:
    return {**os.environ, **ENV, "KEYSWAP_DB": str(db or config.parent / "keyswap.db")}


def keyswap(config: Path, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = environment(config)
    if token:
        env["KEYSWAP_TOKEN"] = token
    return subprocess.run(
        command(config, *args), capture_output=True, text=True, timeout=60, env=env, check=False
    )


def start_keyswap(config: Path, *args: str, db: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command(config, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(config, db),
    )


def write_config(folder: Path, base_url: str, token: str) -> Path:
    config = folder / "keyswap.yaml"
    config.write_text(
        f"""\
version: 1
credentials:
  k: {{ type: bearer, token: "${{env:ECHO_SECRET}}" }}
targets:
  echo: {{ base_url: "{base_url}", credential: k }}
proxies:
  app:   # the proxy under test
    target: echo
    tokens: [{{ id: web, sha256: {digest(token)} }}]
"""
    )
    return config


@contextmanager
def reaped() -> Iterator[list[subprocess.Popen[str]]]:
    """A list for started commands; whatever the test's outcome, each is killed if still
    running and its pipes are closed at the end."""
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


def shown_token(proc: subprocess.Popen[str], config: Path) -> str:
    """The token a `rotate-token` command printed, once it has exited 0."""
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (out, err)
    assert f"rotate-token proxies.app: written to {config}" in out
    return TOKEN.search(out).group(1)  # type: ignore[union-attr]


def rotate(config: Path, token_id: str, db: Path | None = None) -> subprocess.Popen[str]:
    return start_keyswap(config, "proxies", "rotate-token", "app", "--token-id", token_id, db=db)


def wait_until_open(proc: subprocess.Popen[str], path: Path, timeout: float = 20.0) -> None:
    """Until the process has `path` open (Linux /proc): it has reached the lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if any(Path(os.readlink(fd)) == path for fd in Path(f"/proc/{proc.pid}/fd").iterdir()):
                return
        except OSError:  # a descriptor closed meanwhile
            pass
        time.sleep(0.02)
    raise TimeoutError(f"pid {proc.pid} did not open {path} within {timeout} s")


def stored_digests(config: Path) -> dict[str, str]:
    proxy = load_config(config, environ=ENV).config.proxies["app"]
    return {t.id: t.sha256 for t in proxy.tokens}


def audit_rows(db: Path, action: str) -> int:
    conn = sqlite3.connect(db)
    try:
        (count,) = conn.execute("select count(*) from audit where action = ?", [action]).fetchone()
        return int(count)
    finally:
        conn.close()


def test_lifecycle_against_a_running_gateway(tmp_path: Path) -> None:
    echo = start_echo_target(tmp_path)
    token = new_token()
    config = write_config(tmp_path, echo.url, token)
    gateway = start_gateway(config, tmp_path, db=tmp_path / "keyswap.db", env=ENV)
    url = f"{gateway.url}/api/app/x"

    def status(t: str) -> int:
        return httpx.get(url, headers={"x-proxy-token": t}).status_code

    try:
        time.sleep(0.5)  # the gateway announces itself in the database
        assert status(token) == 200

        rotated = keyswap(config, "proxies", "rotate-token", "app", "--token-id", "web")
        assert rotated.returncode == 0, rotated.stderr
        assert "serves the change" in rotated.stdout  # it waited for the gateway
        new = TOKEN.search(rotated.stdout).group(1)  # type: ignore[union-attr]
        assert status(token) == 401 and status(new) == 200

        tested = keyswap(config, "test", "app", "--path", "/hello", token=new)
        assert tested.returncode == 0 and "code     proxy-access-granted" in tested.stdout
        denied = keyswap(config, "test", "app", token=token)
        assert denied.returncode == 1 and "proxy-access-denied" in denied.stdout

        for lang, runner in (("python", [sys.executable, "-"]), ("curl", ["sh", "-s"])):
            snippet = keyswap(
                config, "code", "app", "--lang", lang, "--url", gateway.url, "--path", "/snippet"
            ).stdout
            ran = subprocess.run(
                runner,
                input=snippet,
                capture_output=True,
                text=True,
                timeout=30,
                env={**os.environ, "KEYSWAP_TOKEN": new},
                check=True,
            )
            assert '"path": "/snippet"' in ran.stdout, (lang, ran.stdout, ran.stderr)

        assert keyswap(config, "proxies", "disable", "app").returncode == 0
        r = httpx.get(url, headers={"x-proxy-token": new})
        assert r.status_code == 403 and r.headers["keyswap-proxy-code"] == "proxy-access-denied"
        assert keyswap(config, "proxies", "enable", "app").returncode == 0
        assert status(new) == 200
        assert keyswap(config, "proxies", "delete", "app", "--yes").returncode == 0
        assert status(new) == 404
        assert "# the proxy under test" not in config.read_text()  # went with the proxy
        assert "ECHO_SECRET" in config.read_text()
    finally:
        gateway.stop()
        echo.stop()
    audit = keyswap(config, "audit").stdout
    for action in ("rotate-token", "disable", "enable", "delete"):
        assert action in audit


def test_concurrent_rotations_keep_every_token(tmp_path: Path) -> None:
    """Ten commands at once on one config (and a database none has created yet): each
    token printed is in the file, and each change has its audit row."""
    config = write_config(tmp_path, "http://127.0.0.1:9", new_token())
    with reaped() as started:
        started += [rotate(config, f"t{n}") for n in range(10)]
        tokens = {f"t{n}": shown_token(proc, config) for n, proc in enumerate(started)}
    stored = stored_digests(config)
    assert {i: stored.get(i) for i in tokens} == {i: digest(t) for i, t in tokens.items()}
    assert "web" in stored and "# the proxy under test" in config.read_text()
    assert audit_rows(tmp_path / "keyswap.db", "rotate-token") == 10


def test_commands_on_ten_configs_share_a_new_database(tmp_path: Path) -> None:
    """Different configs have different locks, so their audit rows race for one database
    that does not exist yet (started together: each waits at its config's lock, held
    here, then all are let go at once). No row fails on "database is locked"."""
    configs = []
    for n in range(10):
        (tmp_path / f"c{n}").mkdir()
        configs.append(write_config(tmp_path / f"c{n}", "http://127.0.0.1:9", new_token()))
    db = tmp_path / "shared.db"
    with reaped() as started:
        with ExitStack() as held:
            for config in configs:
                held.enter_context(ConfigEdit(config))
            started += [rotate(config, f"t{n}", db) for n, config in enumerate(configs)]
            for proc, config in zip(started, configs, strict=True):
                wait_until_open(proc, lock_path(config))
        for n, (proc, config) in enumerate(zip(started, configs, strict=True)):
            token = shown_token(proc, config)
            assert stored_digests(config)[f"t{n}"] == digest(token)
    assert audit_rows(db, "rotate-token") == 10


def test_a_command_waits_for_the_lock(tmp_path: Path) -> None:
    """While the lock is held (the way every command takes it), a command that has reached
    the lock changes nothing; once released, it completes."""
    config = write_config(tmp_path, "http://127.0.0.1:9", new_token())
    before = config.read_bytes()
    with reaped() as started:
        with ConfigEdit(config) as held:
            started.append(proc := rotate(config, "late"))
            wait_until_open(proc, lock_path(config))  # starting Python alone takes about 1 s
            time.sleep(1.0)
            assert proc.poll() is None, proc.communicate()
            assert config.read_bytes() == before
            assert held.doc["proxies"]["app"]["target"] == "echo"
        late = shown_token(proc, config)
    assert stored_digests(config)["late"] == digest(late)
