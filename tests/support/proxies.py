"""Real forward proxies for the tests: squid with basic auth, and stunnel in front of it
(an HTTPS proxy). Both come from Debian; `.ci/run` installs them."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import Process, free_port, start

BASIC_NCSA_AUTH = Path("/usr/lib/squid/basic_ncsa_auth")

SQUID_CONF = """\
http_port 127.0.0.1:{port}
pid_filename {dir}/squid.pid
access_log stdio:{dir}/access.log squid
cache_log {dir}/cache.log
cache_store_log none
cache deny all
coredump_dir {dir}
auth_param basic program {helper} {dir}/passwd
auth_param basic realm keyswap-test
acl authed proxy_auth REQUIRED
http_access deny !authed
http_access allow authed
http_access deny all
shutdown_lifetime 0 seconds
logformat squid %ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %un %Sh/%<a %mt
"""


def have_squid() -> bool:
    return (
        bool(shutil.which("squid")) and BASIC_NCSA_AUTH.exists() and bool(shutil.which("htpasswd"))
    )


@dataclass
class Squid(Process):
    dir: Path = Path()

    def access_log(self) -> str:
        path = self.dir / "access.log"
        return path.read_text() if path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        code = super().stop(sig, timeout)
        shutil.rmtree(self.dir, ignore_errors=True)
        return code


def start_squid(user: str, password: str) -> Squid:
    """squid on a free loopback port, requiring basic auth as user:password. Its folder
    sits directly in the system temp dir: squid drops root for its own user, which
    must reach it (pytest's tmp_path is private to root)."""
    work = Path(tempfile.mkdtemp(prefix="keyswap-squid-"))
    work.chmod(0o777)
    subprocess.run(
        ["htpasswd", "-b", "-c", "-B", str(work / "passwd"), user, password],
        check=True,
        capture_output=True,
    )
    (work / "passwd").chmod(0o644)
    port = free_port()
    conf = work / "squid.conf"
    conf.write_text(SQUID_CONF.format(port=port, dir=work, helper=BASIC_NCSA_AUTH))
    p = start(["squid", "-N", "-f", str(conf)], port, work / "out.log")
    return Squid(p.proc, p.port, p.log, work)


def start_stunnel(tmp: Path, cert_pem: Path, connect_port: int) -> Process:
    """TLS on a free port in front of `connect_port`: an HTTPS proxy when that is squid."""
    port = free_port()
    conf = tmp / f"stunnel-{port}.conf"
    conf.write_text(
        f"foreground = yes\npid =\n[proxy]\naccept = 127.0.0.1:{port}\n"
        f"connect = 127.0.0.1:{connect_port}\ncert = {cert_pem}\n"
    )
    return start(
        ["stunnel4" if shutil.which("stunnel4") else "stunnel", str(conf)],
        port,
        tmp / f"stunnel-{port}.log",
    )
