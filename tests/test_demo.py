"""The quick start as a newcomer meets it: `scripts/run` starts the demo, and every
command it prints works when pasted, in bash and (where installed) zsh."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.processes import free_port, wait_for_port

pytestmark = pytest.mark.e2e


def printed(log: Path, until: str, timeout: float = 30.0) -> str:
    """What scripts/run has printed, once it has printed `until`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if until in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"scripts/run never printed {until!r}:\n{log.read_text()}")


def test_scripts_run_prints_commands_that_work_when_pasted(tmp_path: Path) -> None:
    port, target = free_port(), free_port()
    db = tmp_path / "var" / "demo.db"
    env = {
        **os.environ,
        "KEYSWAP_DEMO_PORT": str(port),
        "KEYSWAP_DEMO_FORWARD_PORT": str(free_port()),
        "KEYSWAP_DEMO_TARGET_PORT": str(target),
        "KEYSWAP_DB": str(db),
    }
    env.pop("KEYSWAP_CONFIG", None)
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        demo = subprocess.Popen(
            ["scripts/run"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C's process group: the gateway and the target
        )  # fmt: skip
    try:
        wait_for_port(port, demo, timeout=60)
        text = printed(log, "keyswap logs")
        curls = [line.strip() for line in text.splitlines() if line.strip().startswith("curl ")]
        assert len(curls) == 4, text
        shells = ["bash", *(["zsh"] if shutil.which("zsh") else [])]
        for shell in shells:
            outputs = [
                subprocess.run(
                    [shell, "-c", c], capture_output=True, text=True, timeout=30, check=True
                ).stdout
                for c in curls
            ]
            echoed = json.loads(outputs[0])
            assert echoed["query"] == "name=you", shell  # the URL survives the shell
            assert echoed["headers"]["authorization"] == "Bearer demo-target-secret"
            assert "401 Unauthorized" in outputs[1] and "proxy-access-denied" in outputs[1]
            assert "403 Forbidden" in outputs[2]
            assert json.loads(outputs[3])["status"] == "ok"
        # The command-line lines, pasted into a fresh shell in the repository.
        block = text.split("pointed at the demo:", 1)[1].split("\n\n", 2)[1]
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        assert lines[0] == ". .venv/bin/activate", lines
        time.sleep(1)  # the writer commits every quarter second
        shown = subprocess.run(
            ["bash", "-c", "\n".join(lines)], cwd=ROOT, capture_output=True, text=True,
            timeout=60, env={k: v for k, v in env.items() if k != "KEYSWAP_DB"},
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert re.search(r"demo\s+GET\s+200\s+proxy-access-granted", shown.stdout), shown.stdout
        assert db.exists()
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGINT)
            try:
                demo.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.wait(5)
