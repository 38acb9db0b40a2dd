"""A throwaway PostgreSQL cluster for the tests: `initdb` and `pg_ctl` in a temporary
folder, on 127.0.0.1 at a free port, password authentication over TCP, started once per
test session; each test gets a database of its own. From Debian's postgresql package;
`.ci/run` installs it.

PostgreSQL refuses to run as root: as root, every PostgreSQL program runs as the
`postgres` system user (runuser), in a folder that user owns, with its unix socket
inside that folder."""

from __future__ import annotations

import itertools
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.support.processes import free_port

USER = "keyswap"


def bin_dir() -> Path | None:
    """The newest PostgreSQL's programs: Debian keeps them out of PATH."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: [int(n) for n in p.parent.parent.name.split(".") if n.isdigit()],
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def _as_root() -> bool:
    return os.geteuid() == 0


def have_postgres() -> bool:
    if bin_dir() is None:
        return False
    if _as_root():
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return False
    return True


@dataclass
class Postgres:
    """A running cluster: `url(db)` reaches a database in it as USER, with the password."""

    dir: Path
    port: int
    password: str = field(repr=False)
    _count: itertools.count[int] = field(default_factory=itertools.count, repr=False)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        name = f"test_{os.getpid()}_{next(self._count)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        return self.url(name)

    def log(self) -> str:
        path = self.dir / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        _run(bin_dir(), "pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


def _run(bins: Path | None, program: str, *args: str) -> None:
    assert bins is not None
    command = [str(bins / program), *args]
    if _as_root():
        command = ["runuser", "-u", "postgres", "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{program} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


def start_postgres() -> Postgres:
    """A new cluster in a temporary folder (directly in the system temp dir: the
    `postgres` user must reach it), running until `stop()`."""
    work = Path(tempfile.mkdtemp(prefix="keyswap-pg-"))
    password = "pg-" + secrets.token_hex(12)  # distinctive: tests look for it in outputs
    (work / "password").write_text(password + "\n")
    if _as_root():
        owner = pwd.getpwnam("postgres")
        for path in (work, work / "password"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    bins = bin_dir()
    _run(
        bins,
        "initdb",
        "-D",
        str(work / "data"),
        "-U",
        USER,
        f"--pwfile={work / 'password'}",
        "--auth-host=scram-sha-256",
        "--auth-local=trust",
        "-E",
        "UTF8",
        "--locale=C.UTF-8",
    )
    port = free_port()
    settings = (
        f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={work}"
        " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    pg = Postgres(work, port, password)
    try:
        _run(
            bins, "pg_ctl", "-D", str(work / "data"), "-l", str(work / "postgres.log"),
            "-o", settings, "-w", "-t", "60", "start",
        )  # fmt: skip
    except Exception:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return pg
