"""`keyswap run -- CMD`: CMD gets the forward listener of a live gateway (from the
registry) or --via, an empty NO_PROXY, keyswap's CA, and with --proxy its API key
variable set to $KEYSWAP_TOKEN; keyswap run exits with CMD's status and passes on the
signals that stop it. Real `keyswap` processes and real children throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from keyswap.config.tokens import digest
from keyswap.forward import ca
from keyswap.state.backends import Backend
from keyswap.state.registry import Registration
from tests.support import token_for
from tests.support.processes import BIN

TOKEN = "ks_" + "a" * 43
OTHER_TOKEN = token_for(TOKEN, "other")
VIA = "http://127.0.0.1:8081"
# CMD: prints the named variables as JSON, then exits with status 3
SHOW = (
    "import json, os, sys; "
    "print(json.dumps({k: os.environ.get(k) for k in sys.argv[1:]})); sys.exit(3)"
)
CONFIG = f"""\
version: 1
credentials:
  openai: {{ type: bearer, token: "${{env:OPENAI_API_KEY}}" }}
  hubspot:
    type: oauth2
    grant: client_credentials
    token_url: https://api.hubapi.com/oauth/v1/token
    client_id: id
    client_secret: "${{env:HUBSPOT_CLIENT_SECRET}}"
targets:
  openai: {{ base_url: https://api.openai.com/v1, credential: openai }}
  hubspot: {{ base_url: https://api.hubapi.com, credential: hubspot }}
proxies:
  agent: {{ target: openai, template: openai, tokens: [{{ id: t, sha256: {digest(TOKEN)} }}] }}
  plain: {{ target: openai }}
  crm: {{ target: hubspot, template: hubspot }}
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config whose secrets this shell does not hold (keyswap run never resolves them),
    with keyswap's CA beside it."""
    path = tmp_path_factory.mktemp("run") / "keyswap.yaml"
    path.write_text(CONFIG)
    ca.ensure(ca.folder_for(path))
    return path


def environ(**extra: str) -> dict[str, str]:
    """This environment without keyswap's own variables and the config's secrets."""
    unset = ("KEYSWAP_CONFIG", "KEYSWAP_DB", "KEYSWAP_TOKEN", "OPENAI_API_KEY")
    return {**{k: v for k, v in os.environ.items() if k not in unset}, **extra}


def keyswap_run(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "keyswap"), "run", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=environ() if env is None else env,
        timeout=60,
    )


def shown(config: Path, *args: str, names: list[str], **env: str) -> dict[str, str | None]:
    """The variables as CMD (SHOW) sees them; CMD's status 3 is keyswap run's."""
    done = keyswap_run(config, *args, "--", sys.executable, "-c", SHOW, *names, env=environ(**env))
    assert done.returncode == 3, done.stderr
    found: dict[str, str | None] = json.loads(done.stdout)
    return found


def test_cmd_goes_through_the_forward_listener_trusting_keyswaps_ca(config: Path) -> None:
    folder = ca.folder_for(config)
    names = [
        "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "NO_PROXY", "no_proxy",
        "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO",
        "NODE_EXTRA_CA_CERTS", "NODE_USE_ENV_PROXY", "HOME",
    ]  # fmt: skip
    seen = shown(config, "--via", VIA, names=names, NO_PROXY="localhost", no_proxy=".corp")
    bundle = str(folder / "keyswap-bundle.pem")
    assert seen == {
        **dict.fromkeys(["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"], VIA),
        "NO_PROXY": "",
        "no_proxy": "",
        **dict.fromkeys(["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"], bundle),
        "GIT_SSL_CAINFO": bundle,
        "NODE_EXTRA_CA_CERTS": str(folder / "mitmproxy-ca-cert.pem"),
        "NODE_USE_ENV_PROXY": "1",
        "HOME": os.environ["HOME"],  # the rest of the environment is CMD's as it was
    }


def register(backend: Backend, config: Path, listen: list[dict[str, str]]) -> Registration:
    gateway = Registration(backend, config, listen, lambda: "digest")
    gateway.start()
    return gateway


def test_the_listener_comes_from_the_registry(
    backend: Backend, state_db: str, config: Path
) -> None:
    reverse = {"mode": "reverse", "address": "127.0.0.1:8080"}
    forward = {"mode": "forward", "address": "0.0.0.0:18081"}  # bound to all: loopback here
    gateway = register(backend, config, [reverse, forward])
    try:
        seen = shown(config, "--db", state_db, names=["HTTPS_PROXY", "http_proxy"])
        assert seen == dict.fromkeys(["HTTPS_PROXY", "http_proxy"], "http://127.0.0.1:18081")
    finally:
        gateway.stop()
    reverse_only = register(backend, config, [reverse])
    try:
        done = keyswap_run(config, "--db", state_db, "--", "true")
    finally:
        reverse_only.stop()
    assert done.returncode == 1
    assert f"no live gateway serving {config} listens in forward mode" in done.stderr
    assert "keyswap serve --config" in done.stderr and "--forward" in done.stderr
    assert "--via http://HOST:PORT" in done.stderr


def test_no_gateway_and_no_database(config: Path, tmp_path: Path) -> None:
    done = keyswap_run(config, "--db", str(tmp_path / "none.db"), "--", "true")
    assert done.returncode == 1 and "listens in forward mode" in done.stderr
    assert not (tmp_path / "none.db").exists()


def test_proxy_sets_its_templates_key_variable_to_the_token(config: Path) -> None:
    names = ["OPENAI_API_KEY", "KEYSWAP_TOKEN"]
    seen = shown(config, "--via", VIA, "--proxy", "agent", names=names, KEYSWAP_TOKEN=TOKEN)
    assert seen == {"OPENAI_API_KEY": TOKEN, "KEYSWAP_TOKEN": TOKEN}


def test_a_token_of_another_proxy_is_warned_about(config: Path) -> None:
    done = keyswap_run(
        config, "--via", VIA, "--proxy", "agent", "--", "true",
        env=environ(KEYSWAP_TOKEN=OTHER_TOKEN),
    )  # fmt: skip
    assert done.returncode == 0
    assert "warning: $KEYSWAP_TOKEN is not a token of proxy 'agent' in" in done.stderr
    assert OTHER_TOKEN not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("pid", "token", "message"),
    [
        ("agent", None, "$KEYSWAP_TOKEN is not set: export KEYSWAP_TOKEN with a token of"),
        ("agent", "sk-real-key", "$KEYSWAP_TOKEN is not a proxy token (ks_ and 43 characters)"),
        ("plain", TOKEN, "it was not made from a template. Set it yourself, e.g. API_KEY="),
        ("crm", TOKEN, "its template 'hubspot' has no API key (OAuth2)"),
        ("nope", TOKEN, "no proxy 'nope' in"),
    ],
)
def test_proxy_errors(config: Path, pid: str, token: str | None, message: str) -> None:
    env = environ() if token is None else environ(KEYSWAP_TOKEN=token)
    done = keyswap_run(config, "--via", VIA, "--proxy", pid, "--", "true", env=env)
    assert done.returncode == 1, done.stderr
    assert message in done.stderr
    assert "sk-real-key" not in done.stderr


def test_print_env_is_for_a_shell_and_holds_no_token(config: Path) -> None:
    printed = keyswap_run(
        config, "--via", VIA, "--proxy", "agent", "--print-env",
        env=environ(KEYSWAP_TOKEN=TOKEN),
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    assert TOKEN not in printed.stdout
    assert 'export OPENAI_API_KEY="$KEYSWAP_TOKEN"' in printed.stdout.splitlines()
    assert "export NO_PROXY=''" in printed.stdout.splitlines()
    script = f'eval "$1"; exec {sys.executable} -c "$2" HTTPS_PROXY NO_PROXY OPENAI_API_KEY'
    done = subprocess.run(
        ["bash", "-c", script, "bash", printed.stdout, SHOW],
        capture_output=True,
        text=True,
        env=environ(KEYSWAP_TOKEN=TOKEN, NO_PROXY="localhost"),
    )
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout) == {"HTTPS_PROXY": VIA, "NO_PROXY": "", "OPENAI_API_KEY": TOKEN}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no command to run: keyswap run [OPTIONS] -- CMD [ARGS]..."),
        (["--print-env", "--", "true"], "--print-env prints the variables and runs nothing"),
        (["--via", "https://127.0.0.1:8081", "--", "true"], "Invalid value for --via"),
    ],
)
def test_usage_errors(config: Path, args: list[str], message: str) -> None:
    done = keyswap_run(config, *([] if "--via" in args else ["--via", VIA]), *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_a_missing_config_makes_no_ca(tmp_path: Path) -> None:
    done = keyswap_run(tmp_path / "typo.yaml", "--via", VIA, "--", "true")
    assert done.returncode == 1 and "no config file" in done.stderr
    assert not (tmp_path / "keyswap-ca").exists()


def test_a_command_that_cannot_run_exits_as_a_shell_says(config: Path, tmp_path: Path) -> None:
    missing = keyswap_run(config, "--via", VIA, "--", "no-such-command-here")
    assert missing.returncode == 127
    assert "cannot run no-such-command-here: No such file or directory" in missing.stderr
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")  # not executable
    denied = keyswap_run(config, "--via", VIA, "--", str(script))
    assert denied.returncode == 126 and "Permission denied" in denied.stderr


# --- signals -----------------------------------------------------------------------------

# CMD: counts the SIGINTs it gets; on SIGTERM exits 7 (when asked to handle it).
COUNTER = """\
import signal, sys, time
got = []
signal.signal(signal.SIGINT, lambda *_: got.append(1))
if sys.argv[1] == "handle-term":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    time.sleep(0.05)
sys.exit(10 + len(got))
"""


@contextmanager
def started(config: Path, *cmd: str) -> Iterator[subprocess.Popen[str]]:
    """keyswap run in a process group of its own (a terminal's job), once CMD is ready."""
    with subprocess.Popen(
        [str(BIN / "keyswap"), "run", "--config", str(config), "--via", VIA, "--", *cmd],
        stdout=subprocess.PIPE,
        text=True,
        env=environ(),
        process_group=0,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def test_sigterm_is_passed_on(config: Path) -> None:
    with started(config, sys.executable, "-c", COUNTER, "handle-term", "30") as handled:
        handled.send_signal(signal.SIGTERM)
        assert handled.wait(30) == 7  # CMD handled it: its status is keyswap run's
    with started(config, sys.executable, "-c", COUNTER, "-", "30") as killed:
        killed.send_signal(signal.SIGTERM)
        assert killed.wait(30) == 128 + signal.SIGTERM  # CMD died of it: as a shell says


def test_ctrl_c_reaches_cmd_once(config: Path) -> None:
    """Ctrl-C signals the terminal's whole foreground group: CMD gets it from there, and
    keyswap run does not send a second one."""
    with started(config, sys.executable, "-c", COUNTER, "-", "1.5") as proc:
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 11


def test_sigint_to_keyswap_run_alone_is_passed_on_when_it_comes_again(config: Path) -> None:
    with started(config, sys.executable, "-c", COUNTER, "-", "1.5") as proc:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)  # two at once would be one: signals are not queued
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 11


def test_when_ctrl_c_kills_cmd_keyswap_run_dies_of_it_too(config: Path) -> None:
    """So that the shell script that ran it stops, as it would had CMD run alone."""
    cmd = "import time; print('ready', flush=True); time.sleep(30)"
    with started(config, sys.executable, "-c", cmd) as proc:
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == -signal.SIGINT
