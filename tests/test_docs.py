"""The docs' console examples are executed, so they never drift from what keyswap does.

Every ```console block in README.md and docs/*.md is run, in order, one document at a
time, in a scratch copy of the repository's config/, scripts/ and tests/broken/ with a
real gateway serving config/demo.yaml (scripts/run's demo, its log in var/demo.db) in
front of the real echo target. `$ ` starts a command (a trailing `\\` continues it); the
lines up to the next command are its expected output, where `...` stands for any text,
including none or several lines. `localhost:8080` (or `127.0.0.1:8080`) names the demo
gateway, `127.0.0.1:8081` its forward listener and `127.0.0.1:9911` the echo target,
whatever ports they really have.
`export NAME=...` and `. .venv/bin/activate` (the repository's own environment) carry
over to the document's later commands. Blocks fenced as ```sh are illustrations and are
not run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel

from keyswap.config.model import Config
from tests.support import ROOT
from tests.support.processes import BIN, free_port, start, start_echo_target

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```console\n(.*?)^```$", re.M | re.S)
COPIED = ("config", "scripts", "tests/broken")


@dataclass(frozen=True)
class Step:
    """One command of a console block and the output the document promises."""

    where: str
    command: str
    expected: str


def steps(path: Path) -> list[Step]:
    text = path.read_text()
    found: list[Step] = []
    for block in FENCE.finditer(text):
        line = text.count("\n", 0, block.start()) + 2
        lines = block.group(1).splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ "):
                raise AssertionError(f"{path.name}:{line + i}: output before any `$ ` command")
            start_line = line + i
            command = lines[i][2:]
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command += "\n" + lines[i]  # bash reads the backslash-newline as one line
            i += 1
            out = []
            while i < len(lines) and not lines[i].startswith("$ "):
                out.append(lines[i])
                i += 1
            where = f"{path.relative_to(ROOT)}:{start_line}"
            found.append(Step(where, command, "\n".join(out)))
    return found


def matches(expected: str, actual: str) -> bool:
    """`actual` is `expected` with each `...` standing for any text; trailing spaces and
    blank lines at either end do not count."""
    pattern = ".*?".join(re.escape(part) for part in _tidy(expected).split("..."))
    return re.fullmatch(pattern, _tidy(actual), re.S) is not None


def _tidy(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


@pytest.mark.parametrize("expected, actual, ok", [
    ("a ... c", "a b c", True),
    ("a\n...\nd", "a\nb\nc\nd", True),
    ("status 200", "status 404", False),
    ("x", "x\n", True),
    ("...", "", True),
    ("a", "ab", False),
])  # fmt: skip
def test_the_matcher(expected: str, actual: str, ok: bool) -> None:
    assert matches(expected, actual) is ok


def test_console_blocks_parse_into_commands() -> None:
    parsed = steps(ROOT / "README.md")
    assert parsed, "README.md shows no console example"
    assert all(s.command.strip() for s in parsed)


@pytest.mark.e2e
@pytest.mark.parametrize("doc", [d for d in DOCS if steps(d)], ids=lambda d: d.name)
def test_console_examples_run_as_shown(doc: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    for name in COPIED:
        shutil.copytree(ROOT / name, work / name)
    (work / ".venv").symlink_to(ROOT / ".venv")
    (work / "var").mkdir()
    echo = start_echo_target(tmp_path)
    port_env = {"KEYSWAP_DEMO_TARGET_PORT": str(echo.port)}
    gateway = None
    try:
        port, forward = free_port(), free_port()
        cmd = [str(BIN / "keyswap"), "serve", "--config", str(work / "config" / "demo.yaml")]
        cmd += ["--db", str(work / "var" / "demo.db")]  # as scripts/run does
        cmd += ["--listen", f"127.0.0.1:{port}", "--forward", f"127.0.0.1:{forward}"]
        gateway = start(cmd, port, tmp_path / "gw.log", port_env)
        env = {
            **os.environ,
            **port_env,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "COLUMNS": "200",
        }
        for name in ("KEYSWAP_CONFIG", "KEYSWAP_DB", "KEYSWAP_TOKEN"):
            env.pop(name, None)
        exports: list[str] = []

        def local(text: str) -> str:
            text = re.sub(r"(localhost|127\.0\.0\.1):8080\b", rf"\g<1>:{port}", text)
            text = text.replace("127.0.0.1:8081", f"127.0.0.1:{forward}")
            return text.replace("127.0.0.1:9911", f"127.0.0.1:{echo.port}")

        for step in steps(doc):
            command = local(step.command)
            if command.startswith(("export ", ". ")):
                exports.append(command)
            script = "\n".join([*exports, command])
            done = subprocess.run(
                ["bash", "-c", script],
                cwd=work,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=60,
            )
            actual = done.stdout
            assert matches(local(step.expected), actual), (
                f"{step.where}: `{step.command}` printed:\n{actual}\n"
                f"the document shows:\n{step.expected}"
            )
    finally:
        if gateway is not None:
            gateway.stop()
        echo.stop()


def models_in(annotation: object) -> Iterator[type[BaseModel]]:
    """The pydantic models an annotation names, however deeply (unions, lists, dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in get_args(annotation):
        yield from models_in(arg)


def field_names(model: type[BaseModel]) -> set[str]:
    """A model's fields, by their YAML names (`async`, not `async_`), and those of the
    models nested in it."""
    names = {info.alias or name for name, info in model.model_fields.items()}
    for info in model.model_fields.values():
        for nested in models_in(info.annotation):
            names |= field_names(nested)
    return names


def test_configuration_reference_names_every_field() -> None:
    """docs/configuration.md's reference table has a row per section, naming (in
    backticks) every field the pydantic models accept there."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (.+?) \| (.+) \|$", text, re.M)}
    sections = {name: info for name, info in Config.model_fields.items()}
    top_level = {n for n, info in sections.items() if not list(models_in(info.annotation))}
    top_level -= {"params"}
    expected = {"top level": top_level}
    for name, info in sections.items():
        models = list(models_in(info.annotation))
        if not models:
            continue
        if isinstance(info.annotation, type):  # one mapping (`limits:`), not one per name
            row = f"`{name}`"
        else:
            row = f"`{name}.<{'id' if name == 'proxies' else 'name'}>`"
        expected[row] = set().union(*(field_names(m) for m in models))
    missing = []
    for row, names in expected.items():
        assert row in rows, f"docs/configuration.md has no reference row `| {row} |`"
        quoted = " ".join(re.findall(r"`([^`]*)`", rows[row]))
        missing += [f"{row}: {n}" for n in sorted(names) if not re.search(rf"\b{n}\b", quoted)]
    assert not missing, "fields the reference table does not name:\n" + "\n".join(missing)
