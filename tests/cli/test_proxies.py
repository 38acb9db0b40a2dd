"""The management commands on copies of the example configs (click's CliRunner)."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from keyswap.cli.main import main
from keyswap.cli.proxies import editing
from keyswap.config.edit import ConfigEdit
from keyswap.config.templates import TEMPLATES
from keyswap.config.tokens import digest
from keyswap.state.migrations import SCHEMA_VERSION
from tests.support import ROOT

TOKEN = re.compile(r"\(shown once, store it now\): (ks_[A-Za-z0-9_-]{43})")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "keyswap.yaml"
    shutil.copy(ROOT / "config" / "keyswap.yaml", path)
    shutil.copy(ROOT / "config" / "keyswap.schema.json", tmp_path)
    return path


def run(
    config: Path, *args: str, env: dict[str, str] | None = None, input: str | None = None
) -> Result:
    return CliRunner().invoke(main, [*args, "--config", str(config)], env=env, input=input)


def audit_actions(config: Path) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(config.parent / "keyswap.db")
    try:
        return list(conn.execute("select actor, action, resource from audit order by id"))
    finally:
        conn.close()


def test_list_fits_100_columns_and_filters(config: Path) -> None:
    result = run(config, "proxies", "list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["NAME", "TARGET_URL", "METHODS", "STATUS", "CREATED", "TEMPLATE"]
    assert all(len(line) <= 100 for line in lines)
    assert "crm-prod: CRM production" in result.output
    only = run(config, "proxies", "list", "--search", "stripe", "--json")
    assert [r["id"] for r in json.loads(only.output)] == ["billing"]
    assert [
        r["id"] for r in json.loads(run(config, "proxies", "list", "--env", "dev", "--json").output)
    ] == [
        "agent-llm",
        "billing",
    ]
    run(config, "proxies", "disable", "billing")
    disabled = json.loads(run(config, "proxies", "list", "--status", "disabled", "--json").output)
    assert [r["id"] for r in disabled] == ["billing"]


def test_show_has_the_urls_and_token_ids_but_no_digests(config: Path) -> None:
    result = run(config, "proxies", "show", "crm-prod")
    assert "url:         https://eu.gw.example.com/api/crm-prod" in result.output
    assert "token:       web (created 2026-11-21T10:00:00+00:00)" in result.output
    assert "via:         upstream proxy corporate (http://127.0.0.1:3128)" in result.output
    assert "3bed53eb" not in result.output


def test_create_prints_the_token_once_and_stores_its_digest(config: Path) -> None:
    result = run(
        config,
        "proxies",
        "create",
        "ops",
        "--target",
        "stripe",
        "--name",
        "Ops",
        "--route",
        "/api/ops",
        "--method",
        "get",
        "--origin",
        "https://ops.example.com",
        "--actor",
        "ada",
    )
    assert result.exit_code == 0, result.output
    token = TOKEN.search(result.output).group(1)  # type: ignore[union-attr]
    text = config.read_text()
    assert token not in text and digest(token) in text
    assert "# configuration parameters, per environment" in text  # comments kept
    shown = json.loads(run(config, "proxies", "list", "--search", "ops", "--json").output)[0]
    assert shown["methods"] == ["GET"] and shown["name"] == "Ops"
    assert audit_actions(config) == [("ada", "create", "proxies.ops")]


def test_create_from_a_template(config: Path) -> None:
    env = {"STRIPE_SECRET_KEY": "sk_x"}
    result = run(config, "proxies", "create", "pay", "--template", "stripe", env=env)
    assert result.exit_code == 0, result.output
    assert "credential 'pay' reads STRIPE_SECRET_KEY" in result.output
    check = run(config, "check", env=env)
    assert "pay: /api/pay -> pay (https://api.stripe.com)" in check.output
    assert "${env:STRIPE_SECRET_KEY}" in config.read_text()


def test_invalid_edits_write_nothing(config: Path) -> None:
    before = config.read_bytes()
    for args in (
        ["proxies", "edit", "billing", "--route", "/api/crm-prod"],  # claimed by crm-prod
        ["proxies", "edit", "billing", "--target", "nowhere"],
        ["proxies", "edit", "billing", "--route", "/_keyswap/x"],
        ["proxies", "create", "pay", "--template", "stripe"],  # its env var is not set
    ):
        result = run(config, *args)
        assert result.exit_code == 1, result.output
        assert "nothing was written" in result.output
        assert str(config) in result.output and ".tmp" not in result.output
    assert config.read_bytes() == before
    assert not list(config.parent.glob(".keyswap.yaml.*.tmp"))  # (the lock file stays)


def test_edit_enable_disable_rotate_delete_with_audit(config: Path) -> None:
    assert (
        run(config, "proxies", "edit", "billing", "--description", "Stripe, for jobs").exit_code
        == 0
    )
    assert run(config, "proxies", "disable", "billing").exit_code == 0
    assert "active: false" in config.read_text()
    assert run(config, "proxies", "enable", "billing").exit_code == 0
    rotated = run(config, "proxies", "rotate-token", "billing", "--token-id", "jobs")
    token = TOKEN.search(rotated.output).group(1)  # type: ignore[union-attr]
    assert digest(token) in config.read_text()
    assert (
        "4a31d9920b8592f6802eece93463ee795519da9e50ef0e1db03f11ad7470bec3" not in config.read_text()
    )
    assert (
        run(config, "proxies", "delete", "billing", input="n\n").exit_code == 1
    )  # asked, declined
    assert run(config, "proxies", "delete", "billing", "--yes").exit_code == 0
    text = config.read_text()
    assert "billing:" not in text and "stripe-key:" in text and "  stripe:" in text  # target stays
    assert [a for _, a, _ in audit_actions(config)] == [
        "edit",
        "disable",
        "enable",
        "rotate-token",
        "delete",
    ]
    assert "rotate-token" in run(config, "audit", "--resource", "proxies.billing").output


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_passes_check(tmp_path: Path, name: str) -> None:
    config = tmp_path / "keyswap.yaml"
    config.write_text("version: 1\n")
    env = {var: "set" for var in TEMPLATES[name].env_vars}
    created = run(config, "proxies", "create", name, "--template", name, env=env)
    assert created.exit_code == 0, created.output
    check = run(config, "check", env=env)
    assert (
        check.exit_code == 0
        and f"{name}: /api/{name} -> {name} ({TEMPLATES[name].base_url})" in check.output
    )


def test_templates_list_names_at_least_the_nine() -> None:
    result = CliRunner().invoke(main, ["templates", "list", "--json"])
    names = {t["name"] for t in json.loads(result.output)}
    assert {
        "openai",
        "anthropic",
        "stripe",
        "github",
        "hubspot",
        "slack",
        "twilio",
        "sendgrid",
        "google",
    } <= names
    assert all(t["docs"].startswith("https://") for t in json.loads(result.output))


@pytest.mark.parametrize("lang", ["curl", "python", "javascript", "go"])
def test_code_reads_the_token_from_the_environment(config: Path, lang: str) -> None:
    result = run(config, "code", "billing", "--lang", lang, "--url", "http://127.0.0.1:8080")
    assert result.exit_code == 0
    assert "http://127.0.0.1:8080/api/billing/" in result.output
    assert "KEYSWAP_TOKEN" in result.output and "ks_" not in result.output


def test_export_writes_a_self_contained_folder(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    result = run(config, "export", "crm-prod", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {
        "keyswap.yaml",
        "run.sh",
        "keyswap.service",
        "README.md",
    }
    text = (out / "keyswap.yaml").read_text()
    assert "crm-prod:" in text and "billing:" not in text and "corporate:" in text
    for var in ("HS_SECRET", "HS_REFRESH", "CORP_PROXY_PASSWORD"):
        assert var in (out / "README.md").read_text()
    env = {"KEYSWAP_ENV": "prod"}
    check = CliRunner().invoke(main, ["check", "--config", str(out / "keyswap.yaml")], env=env)
    assert check.exit_code == 0, check.output


def test_a_change_refuses_a_database_of_a_newer_version(config: Path) -> None:
    with sqlite3.connect(config.parent / "keyswap.db") as conn:
        conn.execute("pragma user_version = 7")
    conn.close()
    before = config.read_bytes()
    result = run(config, "proxies", "disable", "billing")
    assert result.exit_code == 1
    assert (
        f"has schema version 7, newer than this keyswap knows ({SCHEMA_VERSION})" in result.output
    )
    assert result.output.rstrip().endswith("nothing was written")
    assert config.read_bytes() == before


def test_a_written_token_is_shown_even_when_its_audit_row_fails(config: Path) -> None:
    no_db = config.parent / "missing" / "keyswap.db"  # SQLite cannot create it
    result = run(
        config, "proxies", "rotate-token", "billing", "--token-id", "jobs", "--db", str(no_db)
    )
    assert result.exit_code == 1
    token = TOKEN.search(result.output).group(1)  # type: ignore[union-attr]
    assert digest(token) in config.read_text()
    assert (
        f"rotate-token proxies.billing is written to {config}, but its audit row could not be"
        f" written: cannot open {no_db}: unable to open database file"
    ) in result.output
    assert result.output.index(token) < result.output.index("Error: ")  # shown first
    assert "Traceback" not in result.output


def test_a_lock_held_too_long_is_a_clear_error(config: Path) -> None:
    with ConfigEdit(config):
        with pytest.raises(click.ClickException) as e, editing(str(config), lock_timeout_s=0.2):
            pass
    assert (
        f"{config} is being changed by another command: its lock {config.parent}/.keyswap.yaml.lock"
        " was held for over 0.2 s; retry when that command has finished"
    ) == e.value.message
    with editing(str(config)) as edit:  # released: free again
        assert edit.locked


def test_only_an_edit_under_the_lock_can_be_saved(config: Path) -> None:
    snapshot = ConfigEdit(config)
    assert "billing" in snapshot.doc["proxies"]  # a read-only look, as `export` takes
    with pytest.raises(RuntimeError, match="outside the lock"):
        snapshot.save()
    with pytest.raises(RuntimeError, match="read before it was locked"):
        snapshot.lock()
    with ConfigEdit(config) as edit:
        edit.doc["proxies"]["billing"]["description"] = "locked"
        edit.save()
    with pytest.raises(RuntimeError, match="outside the lock"):
        edit.save()
    assert "description: locked" in config.read_text()


def audit_rows(config: Path) -> list[tuple[str, str, str]]:
    """(action, resource, detail) of every audit row; none when there is no database."""
    if not (config.parent / "keyswap.db").exists():
        return []
    conn = sqlite3.connect(config.parent / "keyswap.db")
    try:
        return list(conn.execute("select action, resource, detail from audit order by id"))
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def stamp(path: Path) -> tuple[int, bytes]:
    return path.stat().st_mtime_ns, path.read_bytes()


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The configs a command looked for running gateways of, to wait for them."""
    asked: list[Path] = []

    def live_gateways(backend: object, config: Path) -> list[object]:
        asked.append(config)
        return []

    monkeypatch.setattr("keyswap.cli.proxies.live_gateways", live_gateways)
    return asked


def test_yaml_1_2_words_round_trip_as_ids_and_values(config: Path) -> None:
    """`off`, `on`, `yes`, `no`, `y`, `n`: written unquoted by the editor, read back as the
    same strings (YAML 1.1 read most of them as booleans)."""
    args = ("--name", "on", "--description", "yes", "--route", "/api/off")
    created = run(config, "proxies", "create", "off", "--target", "stripe", *args)
    assert created.exit_code == 0, created.output
    assert run(config, "proxies", "create", "y", "--target", "stripe", "--name", "n").exit_code == 0
    edited = run(config, "proxies", "edit", "billing", "--name", "no", "--description", "off")
    assert edited.exit_code == 0, edited.output
    text = config.read_text()
    assert "\n  off:\n    target: stripe\n" in text
    assert "\n    name: on\n    description: yes\n    routes: [/api/off]\n" in text
    assert "\n  y:\n" in text and "name: n\n" in text and "name: no\n" in text
    rows = {r["id"]: r for r in json.loads(run(config, "proxies", "list", "--json").output)}
    assert (rows["off"]["name"], rows["off"]["description"]) == ("on", "yes")
    assert (rows["y"]["name"], rows["billing"]["name"]) == ("n", "no")
    assert rows["billing"]["description"] == "off"
    assert run(config, "proxies", "edit", "off", "--name", "off").exit_code == 0
    assert run(config, "proxies", "disable", "off").exit_code == 0
    shown = run(config, "proxies", "show", "off")
    assert shown.output.startswith("off: off - yes\n  status:      disabled\n"), shown.output
    check = run(config, "check")
    assert check.exit_code == 0 and "  off: /api/off -> stripe" in check.output
    assert run(config, "proxies", "delete", "off", "--yes").exit_code == 0
    assert "off" not in json.loads(run(config, "proxies", "list", "--json").output)


@pytest.mark.parametrize(
    ("first", "again", "says"),
    [
        (("disable", "billing"), ("disable", "billing"), "proxy 'billing' is already disabled"),
        ((), ("enable", "billing"), "proxy 'billing' is already active"),
        (
            ("edit", "billing", "--name", "Billing", "--method", "get"),
            ("edit", "billing", "--name", "Billing", "--method", "GET"),
            "proxy 'billing' already has name 'Billing', methods [GET]",
        ),
    ],
)
def test_a_change_that_changes_nothing_says_so_and_writes_nothing(
    config: Path, waits: list[Path], first: tuple[str, ...], again: tuple[str, ...], says: str
) -> None:
    if first:
        assert run(config, "proxies", *first).exit_code == 0
    rows, before, asked = audit_rows(config), stamp(config), len(waits)
    result = run(config, "proxies", *again)
    assert result.exit_code == 0, result.output
    assert result.output == f"{says}: unchanged\n"
    assert stamp(config) == before  # not even re-laid out
    assert audit_rows(config) == rows
    assert len(waits) == asked  # no wait for gateways to load a change that was not made


def test_a_real_change_waits_for_gateways(config: Path, waits: list[Path]) -> None:
    assert run(config, "proxies", "disable", "billing").exit_code == 0
    assert waits == [config]


DRY_RUNS = [
    ("create", "ops", "--target", "stripe", "--name", "Ops"),
    ("create", "pay", "--template", "stripe"),
    ("edit", "billing", "--name", "Billing jobs", "--method", "GET"),
    ("disable", "billing"),
    ("enable", "billing"),  # after a real disable, below
    ("rotate-token", "billing"),
    ("delete", "billing"),
    ("delete", "crm-prod", "--prune"),
]


@pytest.mark.parametrize("args", DRY_RUNS, ids=lambda a: " ".join(a[:3]))
def test_dry_run_prints_a_diff_and_writes_nothing(
    config: Path, waits: list[Path], args: tuple[str, ...]
) -> None:
    if args[0] == "enable":
        assert run(config, "proxies", "disable", "billing").exit_code == 0
    rows, before, asked = audit_rows(config), stamp(config), len(waits)
    env = {"STRIPE_SECRET_KEY": "sk_x"}
    result = run(config, "proxies", *args, "--dry-run", env=env)  # never asks to confirm
    assert result.exit_code == 0, result.output
    action, pid = args[0], args[1]
    assert f"--- {config}\n+++ {config} ({action} proxies.{pid}, dry run)\n@@ " in result.output
    assert f"dry run: the change is valid; nothing was written to {config}\n" in result.output
    assert stamp(config) == before
    assert audit_rows(config) == rows and len(waits) == asked
    assert not list(config.parent.glob(".keyswap.yaml.*.tmp"))
    assert ": written to" not in result.output and "store it now" not in result.output


def test_dry_run_shows_the_lines_that_change(config: Path) -> None:
    result = run(config, "proxies", "disable", "billing", "--dry-run")
    diff = [line for line in result.output.splitlines() if line[:1] in "+-"]
    assert diff[2:] == ["+    active: false"]
    assert "note: writing also re-lays out 17 other lines" in result.output  # `{ a: b }`
    assert run(config, "proxies", "disable", "billing").exit_code == 0  # the file as written
    again = run(config, "proxies", "enable", "billing", "--dry-run")
    diff = [line for line in again.output.splitlines() if line[:1] in "+-"]
    assert diff[2:] == ["-    active: false", "+    active: true"]
    assert "note:" not in again.output


def test_dry_run_of_rotate_token_shows_no_token_nor_its_digest(config: Path) -> None:
    result = run(config, "proxies", "rotate-token", "billing", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "ks_" not in result.output
    added = [line for line in result.output.splitlines() if line.startswith("+ ")]
    assert len(added) == 1 and "sha256: <sha256 of the new token>," in added[0], added
    assert re.search(r"[0-9a-f]{64}", added[0]) is None
    assert (
        "token jobs: a new token is made and shown once when run without --dry-run" in result.output
    )


def test_dry_run_of_an_invalid_change_fails_like_the_change(config: Path) -> None:
    before = stamp(config)
    result = run(config, "proxies", "edit", "billing", "--target", "nowhere", "--dry-run")
    assert result.exit_code == 1
    assert "target 'nowhere' is not defined" in result.output
    assert "the change would make the config invalid; nothing was written" in result.output
    assert stamp(config) == before


def test_delete_prune_removes_what_only_that_proxy_used(config: Path) -> None:
    env = {"STRIPE_SECRET_KEY": "sk_x"}
    assert run(config, "proxies", "create", "pay", "--template", "stripe", env=env).exit_code == 0
    pruned = run(config, "proxies", "delete", "pay", "--prune", "--yes", "--actor", "ada")
    assert pruned.exit_code == 0, pruned.output
    assert (
        "  pruned: removed target 'pay', credential 'pay', which only proxy 'pay' used\n"
        in pruned.output
    )
    assert "STRIPE_SECRET_KEY" not in config.read_text()
    check = run(config, "check")  # the template's variable is not set: nothing needs it
    assert check.exit_code == 0, check.output
    assert audit_rows(config)[-3:] == [
        (
            "delete",
            "proxies.pay",
            '{"pruned": ["targets.pay", "credentials.pay"], "target": "pay"}',
        ),
        ("delete", "targets.pay", '{"pruned_with": "proxies.pay"}'),
        ("delete", "credentials.pay", '{"pruned_with": "proxies.pay"}'),
    ]


def test_delete_prune_removes_an_upstream_proxy_and_an_emptied_section(config: Path) -> None:
    result = run(config, "proxies", "delete", "crm-prod", "--prune", "--yes")
    assert result.exit_code == 0, result.output
    assert (
        "removed target 'hubspot', credential 'hubspot', upstream proxy 'corporate', which"
        " only proxy 'crm-prod' used"
    ) in result.output
    text = config.read_text()
    assert "hubspot" not in text and "corporate" not in text
    assert "upstream_proxies" not in text  # it held only `corporate`
    assert "# target credentials (secrets)" in text  # the other sections keep their comments
    assert run(config, "check").exit_code == 0


def test_delete_prune_never_removes_what_another_proxy_uses(config: Path) -> None:
    assert run(config, "proxies", "create", "jobs2", "--target", "stripe").exit_code == 0
    result = run(config, "proxies", "delete", "billing", "--prune", "--yes")
    assert result.exit_code == 0, result.output
    assert "  kept target 'stripe': used by proxy 'jobs2'\n" in result.output
    assert "pruned" not in result.output
    text = config.read_text()
    assert "  stripe:\n" in text and "stripe-key:" in text
    assert audit_rows(config)[-1] == (
        "delete",
        "proxies.billing",
        '{"pruned": [], "target": "stripe"}',
    )


def test_delete_prune_keeps_a_credential_another_target_uses(config: Path) -> None:
    env = {"STRIPE_KEY": "sk_x"}
    created = run(config, "proxies", "create", "pay", "--target", "stripe")
    assert created.exit_code == 0
    with editing(str(config)) as edit:  # a second target with the same credential
        edit.section("targets")["stripe2"] = {
            "base_url": "https://api2.example",
            "credential": "stripe-key",
        }
        edit.doc["proxies"]["pay"]["target"] = "stripe2"
        edit.save()
    result = run(config, "proxies", "delete", "pay", "--prune", "--yes", env=env)
    assert result.exit_code == 0, result.output
    assert "removed target 'stripe2', which only proxy 'pay' used" in result.output
    assert "  kept credential 'stripe-key': used by target 'stripe'\n" in result.output


def test_check_warns_about_what_a_deleted_proxy_left_behind(config: Path) -> None:
    env = {"STRIPE_SECRET_KEY": "sk_x"}
    assert run(config, "proxies", "create", "pay", "--template", "stripe", env=env).exit_code == 0
    assert run(config, "proxies", "delete", "pay", "--yes", env=env).exit_code == 0
    stuck = run(config, "check")  # what --prune avoids: a credential nothing uses stops it all
    assert stuck.exit_code == 1 and "credentials.pay.token: environment variable" in stuck.output
    check = run(config, "check", env=env)
    assert check.exit_code == 0, check.output
    assert f"warning: {config}:" in check.output
    assert ": targets.pay: no proxy uses this target\n" in check.output
    assert ": credentials.pay: used only by unused target 'pay'\n" in check.output
    assert ": credentials.legacy: no target uses this credential\n" in check.output
