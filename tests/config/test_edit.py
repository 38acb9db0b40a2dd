"""ConfigEdit: an edit that changes nothing, a dry run, and deleting entries."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyswap.config.edit import ConfigEdit
from keyswap.config.loader import ConfigError, load_config

TEXT = """\
version: 1
credentials:     # the secrets
  key: { type: bearer, token: "${env:HOME}" }
targets:
  api: { base_url: "https://api.example.com", credential: key }
proxies:         # one per application
  off:
    name: on
    target: api
"""


@pytest.fixture
def config(write_config) -> Path:
    path: Path = write_config(TEXT)
    return path


def stamp(path: Path) -> tuple[int, bytes]:
    return path.stat().st_mtime_ns, path.read_bytes()


def test_an_edit_that_changes_nothing_writes_nothing(config: Path) -> None:
    before = stamp(config)
    with ConfigEdit(config) as edit:
        edit.doc["proxies"]["off"]["name"] = "on"
        change = edit.save()
    assert change.unchanged and not change.written and change.loaded is None
    assert stamp(config) == before  # although ruamel.yaml would re-space `{ ... }`


def test_a_dry_run_validates_and_writes_nothing(config: Path) -> None:
    before = stamp(config)
    with ConfigEdit(config, dry_run=True) as edit:
        edit.doc["proxies"]["off"]["name"] = "yes"
        change = edit.save()
    assert not change.unchanged and not change.written
    assert change.loaded is not None and change.loaded.config.proxies["off"].name == "yes"
    assert change.diff("rename") == (
        f"--- {config}\n+++ {config} (rename)\n@@ -5,5 +5,5 @@\n"
        '   api: {base_url: "https://api.example.com", credential: key}\n'
        " proxies:         # one per application\n"
        "   off:\n"
        "-    name: on\n"
        "+    name: yes\n"
        "     target: api"
    )
    assert change.relaid == 2  # the two `{ ... }` lines the write would re-space
    assert stamp(config) == before
    assert not list(config.parent.glob("*.tmp"))


def test_a_dry_run_of_a_broken_edit_fails_as_the_edit_would(config: Path) -> None:
    with ConfigEdit(config, dry_run=True) as edit:
        edit.doc["proxies"]["off"]["target"] = "nowhere"
        with pytest.raises(ConfigError, match="target 'nowhere' is not defined"):
            edit.save()
    assert config.read_text() == TEXT


def test_the_written_file_reads_as_the_editor_meant(config: Path) -> None:
    with ConfigEdit(config) as edit:
        edit.doc["proxies"]["off"]["description"] = "no"
        edit.section("proxies")["yes"] = {"target": "api", "name": "y"}
        assert edit.save().written
    proxies = load_config(config).config.proxies
    assert (proxies["off"].name, proxies["off"].description) == ("on", "no")
    assert proxies["yes"].name == "y"
    assert "  yes:\n" in config.read_text()  # unquoted, as YAML 1.2 allows


def test_deleting_the_last_entry_deletes_its_section(config: Path) -> None:
    with ConfigEdit(config) as edit:
        edit.remove("proxies", "off")
        edit.remove("targets", "api")
        edit.remove("credentials", "key")
        edit.save()
    # `credentials: {}` would have been written under `# the secrets`: not YAML.
    assert config.read_text() == "version: 1\n"


def test_a_deleted_entry_leaves_no_comment_behind_for_a_namesake(write_config) -> None:
    path = write_config("version: 1\nproxies:\n  a: {target: t}  # old a\n  b: {target: t}\n")
    with ConfigEdit(path) as edit:
        edit.remove("proxies", "a")
        edit.doc["proxies"]["a"] = {"target": "t"}
        assert "old a" not in edit.text()
