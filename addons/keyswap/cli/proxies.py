"""`keyswap proxies ...`: managing proxies the way a dashboard would, by editing the config
file (locked against other commands, comments kept, validated first, replaced atomically,
audited) and waiting for running gateways to load the change."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import httpx
from ruamel.yaml.comments import CommentedMap

from keyswap.cli.options import (
    config_option,
    default_db,
    json_option,
    load_or_fail,
    print_json,
    table,
)
from keyswap.config.edit import (
    LOCK_TIMEOUT_S,
    Change,
    ConfigEdit,
    ConfigLocked,
    flow_map,
    flow_seq,
)
from keyswap.config.loader import ConfigError
from keyswap.config.model import Config, Proxy
from keyswap.config.templates import TEMPLATES, Template
from keyswap.config.tokens import digest, new_token
from keyswap.state import migrations
from keyswap.state.backends import Backend, SchemaTooNew, StateError, is_url, open_backend
from keyswap.state.registry import Gateway, live_gateways
from keyswap.state.store import audit

ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


WAIT_S = 5.0


LIST_WIDTHS = {
    "name": 28,
    "target_url": 24,
    "methods": 11,
    "status": 8,
    "created": 10,
    "template": 9,
}


db_for = click.option(
    "--db", "db_path", metavar="PATH|URL", help="State database (audit, running gateways)."
)


actor_option = click.option("--actor", help="Who makes the change [default: the OS user].")


dry_run_option = click.option(
    "--dry-run", is_flag=True, help="Print the change as a diff of the YAML; write nothing."
)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def proxy_urls(config: Config, pid: str) -> list[str]:
    """The proxy's URLs under `public_base_url` (the "copy URL" of a dashboard)."""
    if not config.public_base_url:
        return []
    base = config.public_base_url.replace("{region}", config.region or "").rstrip("/")
    return [base + route for route in config.routes_of(pid)]


def proxy_or_fail(config: Config, pid: str) -> Proxy:
    proxy = config.proxies.get(pid)
    if proxy is None:
        raise click.ClickException(
            f"no proxy '{pid}' (known: {', '.join(sorted(config.proxies)) or 'none'})"
        )
    return proxy


@contextmanager
def editing(
    config_path: str, *, lock_timeout_s: float = LOCK_TIMEOUT_S, dry_run: bool = False
) -> Iterator[ConfigEdit]:
    """The config file, locked against every other command from its read to the end of
    the block (see `commit`), with a lock that is busy too long as a clear error."""
    edit = ConfigEdit(config_path, lock_timeout_s=lock_timeout_s, dry_run=dry_run)
    try:
        edit.lock()
    except ConfigLocked as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot edit {config_path}: {e}") from None
    try:
        yield edit
    finally:
        edit.unlock()


@dataclass(frozen=True)
class NewToken:
    """A proxy token just made: its digest goes into the file, the token is shown once."""

    id: str
    token: str

    @property
    def sha256(self) -> str:
        return digest(self.token)


AuditRow = tuple[str, str, dict[str, Any]]  # action, resource, detail


def commit(
    edit: ConfigEdit,
    db_path: str | None,
    action: str,
    resource: str,
    detail: dict[str, Any],
    actor: str | None,
    *,
    unchanged: str = "",
    token: NewToken | None = None,
    also: Sequence[AuditRow] = (),
) -> Change:
    """Validate and write the edit, audit it (and `also`), release the lock, wait for
    running gateways to load the change, and print the new `token` last. An edit that
    changes nothing prints `unchanged` (what is already so); a dry run prints the diff.
    Neither writes, audits nor waits."""
    _refuse_a_newer_schema(edit, db_path)
    try:
        change = edit.save()
    except ConfigError as e:
        for problem in e.problems:
            click.echo(f"error: {problem}", err=True)
        raise click.ClickException(
            "the change would make the config invalid; nothing was written"
        ) from None
    if change.unchanged:
        click.echo(f"{unchanged or f'{action} {resource} changes nothing'}: unchanged")
        return change
    if not change.written:
        _show_dry_run(change, action, resource, token)
        return change
    loaded = change.loaded
    assert loaded is not None
    try:
        click.echo(f"{action} {resource}: written to {edit.path}")
        with ExitStack() as stack:
            try:
                backend = stack.enter_context(open_backend(db_path or default_db(edit.path)))
                migrations.upgrade(backend)
                # Still under the lock, so that no change is written without its audit
                # row being attempted, and the rows are in the order of the changes.
                with backend.session() as session:
                    for row in ((action, resource, detail), *also):
                        audit(session, *row, actor)
            except StateError as e:
                raise click.ClickException(
                    f"{action} {resource} is written to {edit.path}, but its audit row could"
                    f" not be written: {e}"
                ) from None
            # Waiting takes up to WAIT_S: other commands need not queue behind it.
            edit.unlock()
            for line in wait_for(backend, edit.path, loaded.digest):
                click.echo(line)
    finally:
        # The token comes last, after what changed and who serves it (as the docs show),
        # but once the file holds its digest it is printed on every way out: before the
        # error when the audit row fails, on Ctrl-C while waiting. A token in the file
        # that was never shown can never be used, nor shown again.
        if token is not None:
            click.echo(f"token {token.id} (shown once, store it now): {token.token}")
    return change


def _refuse_a_newer_schema(edit: ConfigEdit, db_path: str | None) -> None:
    """Before anything is written: a database that a newer keyswap upgraded takes no
    audit row from this one, so the change is refused whole. (A database that cannot be
    reached is said when the audit row is written, after the file, as the token is.)"""
    db = db_path or default_db(edit.path)
    if edit.dry_run or not (is_url(db) or Path(db).exists()):
        return
    try:
        with open_backend(db) as backend:
            migrations.writable(backend)
    except SchemaTooNew as e:
        raise click.ClickException(f"{e}; nothing was written") from None
    except StateError:
        return


def _show_dry_run(change: Change, action: str, resource: str, token: NewToken | None) -> None:
    # A dry run's token is never shown, nor its digest: it will not be the one written.
    placeholders = {token.sha256: "<sha256 of the new token>"} if token else {}
    click.echo(change.diff(f"{action} {resource}, dry run", placeholders))
    if change.relaid:
        lines = f"{change.relaid} other line{'s' * (change.relaid != 1)}"
        click.echo(
            f"note: writing also re-lays out {lines} as ruamel.yaml writes them"
            " (`{ a: b }` becomes `{a: b}`); the diff leaves them out"
        )
    click.echo(f"dry run: the change is valid; nothing was written to {change.path}")
    if token is not None:
        click.echo(
            f"token {token.id}: a new token is made and shown once when run without --dry-run"
        )


def wait_for(backend: Backend, config_path: Path, digest_: str) -> Iterator[str]:
    """Wait until every live gateway of this config serves the one with this digest: its
    registry row says so (a gateway rewrites it after every reload) or its health
    endpoint does. A line for each, a warning for each that does not within WAIT_S."""
    try:
        pending = {g.id: g for g in live_gateways(backend, config_path)}
    except StateError as e:
        yield f"warning: cannot tell which gateways serve {config_path} ({e})"
        return
    started = time.monotonic()
    while pending:
        try:
            rows = {g.id: g for g in live_gateways(backend, config_path)}
        except StateError:
            rows = {}
        for gateway in list(pending.values()):
            said = rows.get(gateway.id, gateway).config_digest
            if said == digest_ or _health_serves(gateway, digest_):
                del pending[gateway.id]
                took = time.monotonic() - started
                yield f"{_named(gateway)} serves the change ({took:.1f} s)"
        if time.monotonic() - started >= WAIT_S:
            break
        time.sleep(0.1)
    for gateway in pending.values():
        yield f"warning: {_named(gateway)} has not loaded the change within {WAIT_S:.0f} s"


def _named(gateway: Gateway) -> str:
    url = gateway.url()
    return f"gateway {gateway.id}" + (f" at {url}" if url else "")


def _health_serves(gateway: Gateway, digest_: str) -> bool:
    """Whether the gateway's health endpoint reports this digest. Several processes may
    share its address (`serve --workers`): only this one's answer (its pid) counts."""
    url = gateway.url()
    if url is None:
        return False
    try:
        health = httpx.get(f"{url}/_keyswap/health", timeout=0.5).json()
    except (httpx.HTTPError, ValueError):
        return False
    return bool(
        health.get("pid", gateway.pid) == gateway.pid
        and health.get("config", {}).get("digest") == digest_
    )


@click.group()
def proxies() -> None:
    """List, create, change and delete proxies.

    \b
    Example:
      keyswap proxies list --status active
    """


@proxies.command("list")
@config_option
@click.option("--search", help="Text in the name, id, description or target URL.")
@click.option("--env", help="Only proxies served in this environment.")
@click.option("--region", help="Only proxies in this region (or in none).")
@click.option("--status", type=click.Choice(["active", "disabled"]))
@click.option("--sort", type=click.Choice(["name", "created"]), default="name", show_default=True)
@json_option
def list_proxies(
    config_path: str,
    search: str | None,
    env: str | None,
    region: str | None,
    status: str | None,
    sort: str,
    as_json: bool,
) -> None:
    """List proxies: name and description, target URL, methods, status, created, template.

    \b
    Example:
      keyswap proxies list --search crm --sort created
    """
    config = load_or_fail(config_path).config
    rows = []
    for pid, proxy in config.proxies.items():
        target = config.targets[proxy.target]
        row = {
            "id": pid,
            "name": proxy.name or pid,
            "description": proxy.description,
            "target_url": target.base_url,
            "methods": proxy.methods or ["all"],
            "status": "active" if proxy.active else "disabled",
            "created": proxy.created.strftime("%Y-%m-%d") if proxy.created else "",
            "template": proxy.template or "",
            "environments": proxy.environments,
            "region": proxy.region,
        }
        text = " ".join([pid, proxy.name, proxy.description, target.base_url]).lower()
        if search and search.lower() not in text:
            continue
        if env and proxy.environments is not None and env not in proxy.environments:
            continue
        if region and proxy.region not in (None, region):
            continue
        if status and row["status"] != status:
            continue
        rows.append(row)
    rows.sort(key=lambda r: (r["created"] or "~") if sort == "created" else str(r["name"]).lower())
    if as_json:
        print_json(rows)
        return
    shown = []
    for row in rows:
        label = f"{row['id']}: {row['name']}" + (
            f" - {row['description']}" if row["description"] else ""
        )
        cells = {**row, "name": label, "methods": ",".join(row["methods"])}  # type: ignore[arg-type]
        shown.append({k: _short(str(cells[k]), w) for k, w in LIST_WIDTHS.items()})
    click.echo(table(shown, list(LIST_WIDTHS)))  # type: ignore[arg-type]


@proxies.command("show")
@config_option
@click.argument("pid", metavar="ID")
@json_option
def show(config_path: str, pid: str, as_json: bool) -> None:
    """Everything about one proxy: URLs, target, routes, rules, tokens (ids and dates).

    \b
    Example:
      keyswap proxies show crm-prod
    """
    config = load_or_fail(config_path).config
    proxy = proxy_or_fail(config, pid)
    target = config.targets[proxy.target]
    if as_json:
        print_json(
            {
                "id": pid,
                **proxy.model_dump(mode="json", by_alias=True, exclude={"rules", "tokens"}),
                "rules": [r.model_dump(mode="json", exclude_none=True) for r in proxy.rules],
                "routes": config.routes_of(pid),
                "urls": proxy_urls(config, pid),
                "target_url": target.base_url,
                "credential": target.credential,
                "upstream_proxy": target.upstream_proxy,
                # the ids and dates, never the digests
                "tokens": [{"id": t.id, "created": t.created} for t in proxy.tokens],
            }
        )
        return
    lines = [
        f"{pid}: {proxy.name or pid}" + (f" - {proxy.description}" if proxy.description else "")
    ]
    lines.append(f"  status:      {'active' if proxy.active else 'disabled'}")
    for url in proxy_urls(config, pid):
        lines.append(f"  url:         {url}")
    lines.append(f"  routes:      {', '.join(config.routes_of(pid))}")
    lines.append(
        f"  target:      {proxy.target} ({target.base_url}), credential {target.credential}"
    )
    if target.upstream_proxy:
        up = config.upstream_proxies[target.upstream_proxy]
        lines.append(
            f"  via:         upstream proxy {target.upstream_proxy} ({up.type}://{up.host}:{up.port})"
        )
    lines.append(f"  methods:     {', '.join(proxy.methods) if proxy.methods else 'all'}")
    for rule in proxy.rules:
        what = rule.match.model_dump(exclude_none=True) or "everything"
        lines.append(f"  rule:        {rule.action} {what}")
    if proxy.allowed_origins:
        lines.append(f"  origins:     {', '.join(proxy.allowed_origins)}")
    if proxy.rate_limit:
        lines.append(f"  rate limit:  {proxy.rate_limit}")
    lines.append(
        f"  environments: {', '.join(proxy.environments) if proxy.environments else 'all'}"
    )
    if proxy.template:
        lines.append(f"  template:    {proxy.template}")
    if proxy.created:
        lines.append(f"  created:     {proxy.created.isoformat()}")
    for token in proxy.tokens:
        created = token.created.isoformat() if token.created else "unknown"
        lines.append(f"  token:       {token.id} (created {created})")
    click.echo("\n".join(lines))


def _proxy_options(f: Any) -> Any:
    for option in reversed(
        [
            click.option("--name", help="Display name."),
            click.option("--description", help="What the proxy is for."),
            click.option(
                "--route", "routes", multiple=True, help="Route (repeatable) [default: /api/<ID>]."
            ),
            click.option(
                "--method",
                "methods",
                multiple=True,
                help="Allowed method (repeatable) [default: all].",
            ),
            click.option(
                "--origin", "origins", multiple=True, help="Allowed browser origin (repeatable)."
            ),
        ]
    ):
        f = option(f)
    return f


def _apply(
    proxy: CommentedMap,
    name: str | None,
    description: str | None,
    routes: tuple[str, ...],
    methods: tuple[str, ...],
    origins: tuple[str, ...],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Set the options given on `proxy`: (every option given, those that differed)."""
    given: dict[str, Any] = {}
    for key, value in (("name", name), ("description", description)):
        if value is not None:
            given[key] = value
    for key, values in (
        ("routes", list(routes)),
        ("methods", [m.upper() for m in methods]),
        ("allowed_origins", list(origins)),
    ):
        if values:
            given[key] = values
    # Only what differs is set: the same value written again may change its layout.
    changed = {key: value for key, value in given.items() if proxy.get(key) != value}
    for key, value in changed.items():
        proxy[key] = flow_seq(value) if isinstance(value, list) else value
    return given, changed


def _values(given: dict[str, Any]) -> str:
    def shown(value: Any) -> str:
        return f"[{', '.join(value)}]" if isinstance(value, list) else f"'{value}'"

    return ", ".join(f"{key} {shown(value)}" for key, value in given.items())


@proxies.command("create")
@config_option
@db_for
@actor_option
@click.argument("pid", metavar="ID")
@click.option("--target", help="An existing target.")
@click.option(
    "--template",
    type=click.Choice(sorted(TEMPLATES)),
    help="Create target and credential from a template.",
)
@_proxy_options
@click.option("--token-id", default="default", show_default=True, help="Name of the first token.")
@dry_run_option
def create(
    config_path: str,
    db_path: str | None,
    actor: str | None,
    pid: str,
    target: str | None,
    template: str | None,
    name: str | None,
    description: str | None,
    routes: tuple[str, ...],
    methods: tuple[str, ...],
    origins: tuple[str, ...],
    token_id: str,
    dry_run: bool,
) -> None:
    """Create a proxy in front of a target (or a template's target) and print its token once.

    \b
    Example:
      keyswap proxies create billing --template stripe --name Billing --origin https://app.example.com
    """
    if not ID.fullmatch(pid):
        raise click.BadParameter("lowercase letters, digits, '-' and '_'", param_hint="ID")
    if (target is None) == (template is None):
        raise click.UsageError("give --target T or --template NAME")
    with editing(config_path, dry_run=dry_run) as edit:
        if pid in edit.section("proxies"):
            raise click.ClickException(f"proxy '{pid}' exists; use keyswap proxies edit {pid}")
        proxy = CommentedMap()
        notes = []
        if template is not None:
            t = TEMPLATES[template]
            target = pid
            if pid in edit.section("targets") or pid in edit.section("credentials"):
                raise click.ClickException(f"a target or credential '{pid}' exists; use --target")
            _add_template(edit, pid, t)
            proxy.update(_template_proxy(t))
            notes.append(
                f"credential '{pid}' reads {', '.join(t.env_vars)}; set them where the gateway runs"
            )
        proxy["target"] = target
        token = NewToken(token_id, new_token())
        proxy["created"] = _now()
        given, _ = _apply(proxy, name, description, routes, methods, origins)
        proxy["tokens"] = [flow_map({"id": token_id, "sha256": token.sha256, "created": _now()})]
        edit.section("proxies")[pid] = proxy
        commit(
            edit,
            db_path,
            "create",
            f"proxies.{pid}",
            {"target": target, "template": template, **given},
            actor,
            token=token,
        )
    for note in notes:
        click.echo(note)


def _add_template(edit: ConfigEdit, name: str, t: Template) -> None:
    edit.section("credentials")[name] = CommentedMap(t.credential)
    edit.section("targets")[name] = CommentedMap({"base_url": t.base_url, "credential": name})
    edit.section("targets")[name].yaml_add_eol_comment(f"{t.title}: {t.docs}", "base_url")


def _template_proxy(t: Template) -> dict[str, Any]:
    proxy: dict[str, Any] = {"template": t.name}
    if t.methods:
        proxy["methods"] = flow_seq(t.methods)
    if t.rules:
        proxy["rules"] = [flow_map(rule) for rule in t.rules]
    if t.request_headers:
        proxy["request_headers"] = t.request_headers
    if t.response_headers:
        proxy["response_headers"] = t.response_headers
    if t.rate_limit:
        proxy["rate_limit"] = t.rate_limit
    return proxy


@proxies.command("edit")
@config_option
@db_for
@actor_option
@click.argument("pid", metavar="ID")
@click.option("--target", help="Point the proxy at another target.")
@_proxy_options
@dry_run_option
def edit_proxy(
    config_path: str,
    db_path: str | None,
    actor: str | None,
    pid: str,
    target: str | None,
    name: str | None,
    description: str | None,
    routes: tuple[str, ...],
    methods: tuple[str, ...],
    origins: tuple[str, ...],
    dry_run: bool,
) -> None:
    """Change a proxy's name, description, target, routes, methods or origins.

    \b
    Example:
      keyswap proxies edit crm-prod --method GET --method POST --origin https://app.example.com
    """
    if (target, name, description) == (None, None, None) and not (routes or methods or origins):
        raise click.UsageError("nothing to change: give at least one option")
    with editing(config_path, dry_run=dry_run) as edit:
        proxy = _editable(edit, pid)
        given, changed = _apply(proxy, name, description, routes, methods, origins)
        if target is not None:
            given["target"] = target
            if proxy.get("target") != target:
                proxy["target"] = changed["target"] = target
        already = f"proxy '{pid}' already has {_values(given)}"
        change = commit(edit, db_path, "edit", f"proxies.{pid}", changed, actor, unchanged=already)
    if change.written:
        for key, value in changed.items():
            click.echo(f"  {key}: {value}")


def _editable(edit: ConfigEdit, pid: str) -> CommentedMap:
    section = edit.section("proxies")
    if pid not in section:
        raise click.ClickException(
            f"no proxy '{pid}' (known: {', '.join(sorted(section)) or 'none'})"
        )
    proxy = section[pid]
    if not isinstance(proxy, CommentedMap):
        raise click.ClickException(f"proxies.{pid} is not a mapping")
    return proxy


def _set_active(
    config_path: str, db_path: str | None, actor: str | None, pid: str, active: bool, dry_run: bool
) -> None:
    with editing(config_path, dry_run=dry_run) as edit:
        proxy = _editable(edit, pid)
        if proxy.get("active", True) != active:  # an absent `active` is true: left absent
            proxy["active"] = active
        commit(
            edit,
            db_path,
            "enable" if active else "disable",
            f"proxies.{pid}",
            {"active": active},
            actor,
            unchanged=f"proxy '{pid}' is already {'active' if active else 'disabled'}",
        )


@proxies.command("enable")
@config_option
@db_for
@actor_option
@click.argument("pid", metavar="ID")
@dry_run_option
def enable(
    config_path: str, db_path: str | None, actor: str | None, pid: str, dry_run: bool
) -> None:
    """Let a disabled proxy serve again.

    \b
    Example:
      keyswap proxies enable crm-prod
    """
    _set_active(config_path, db_path, actor, pid, True, dry_run)


@proxies.command("disable")
@config_option
@db_for
@actor_option
@click.argument("pid", metavar="ID")
@dry_run_option
def disable(
    config_path: str, db_path: str | None, actor: str | None, pid: str, dry_run: bool
) -> None:
    """Refuse every request to a proxy (403) without deleting it.

    \b
    Example:
      keyswap proxies disable crm-prod --dry-run
    """
    _set_active(config_path, db_path, actor, pid, False, dry_run)


@proxies.command("rotate-token")
@config_option
@db_for
@actor_option
@click.argument("pid", metavar="ID")
@click.option("--token-id", help="The token to replace (added when new) [default: the first].")
@dry_run_option
def rotate_token(
    config_path: str,
    db_path: str | None,
    actor: str | None,
    pid: str,
    token_id: str | None,
    dry_run: bool,
) -> None:
    """Replace a proxy token: the new one is printed once, the old one stops working.

    \b
    Example:
      keyswap proxies rotate-token crm-prod --token-id web
    """
    with editing(config_path, dry_run=dry_run) as edit:
        proxy = _editable(edit, pid)
        tokens = proxy.get("tokens")
        if tokens is None:
            tokens = proxy["tokens"] = []
        token_id = token_id or (tokens[0]["id"] if tokens else "default")
        token = NewToken(token_id, new_token())
        entry = flow_map({"id": token_id, "sha256": token.sha256, "created": _now()})
        found = [i for i, t in enumerate(tokens) if t.get("id") == token_id]
        if found:
            tokens[found[0]] = entry
        else:
            tokens.append(entry)
        detail = {"token_id": token_id}
        commit(edit, db_path, "rotate-token", f"proxies.{pid}", detail, actor, token=token)


@proxies.command("delete")
@config_option
@db_for
@actor_option
@click.argument("pid", metavar="ID")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--prune",
    is_flag=True,
    help="Also delete the target, credential and upstream proxy that only this proxy used.",
)
@dry_run_option
def delete(
    config_path: str,
    db_path: str | None,
    actor: str | None,
    pid: str,
    yes: bool,
    prune: bool,
    dry_run: bool,
) -> None:
    """Delete a proxy and its rules and tokens; its target and credential stay unless
    --prune is given and no other proxy uses them.

    \b
    Example:
      keyswap proxies delete crm-prod --prune --yes
    """
    if not yes and not dry_run:
        # Asked on a snapshot, before the lock: a person thinking must not hold up other
        # commands (the proxy is looked up again under the lock).
        _editable(ConfigEdit(config_path), pid)
        also = ", and what only it uses" if prune else ""
        click.confirm(f"delete proxy '{pid}' (its routes stop at once){also}?", abort=True)
    with editing(config_path, dry_run=dry_run) as edit:
        target = _editable(edit, pid).get("target")
        edit.remove("proxies", pid)
        pruned, kept = _prune(edit, str(target)) if prune else ([], [])
        detail: dict[str, Any] = {"target": target}
        if prune:
            detail["pruned"] = [f"{section}.{name}" for section, name in pruned]
        rows = [
            ("delete", f"{section}.{name}", {"pruned_with": f"proxies.{pid}"})
            for section, name in pruned
        ]
        change = commit(edit, db_path, "delete", f"proxies.{pid}", detail, actor, also=rows)
    if pruned:
        what = ", ".join(f"{SECTION_WORDS[section]} '{name}'" for section, name in pruned)
        removed = "removed" if change.written else "would remove"
        click.echo(f"  pruned: {removed} {what}, which only proxy '{pid}' used")
    for line in kept:
        click.echo(f"  kept {line}")


SECTION_WORDS = {
    "targets": "target",
    "credentials": "credential",
    "upstream_proxies": "upstream proxy",
}


def _prune(edit: ConfigEdit, target: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Delete the target of a deleted proxy when no other proxy uses it, then its
    credential and upstream proxy when no other target uses them: (what was deleted, as
    (section, name); what was kept, and why)."""
    # `edit.doc.get`, not `edit.section`: a section left empty is gone, and stays gone.
    if target not in (edit.doc.get("targets") or {}):
        return [], []
    proxies = edit.doc.get("proxies") or {}
    users = [p for p, proxy in proxies.items() if proxy.get("target") == target]
    if users:
        return [], [f"target '{target}': used by proxy {_names(users)}"]
    removed = edit.remove("targets", target)
    pruned, kept = [("targets", target)], []
    for field, section in (("credential", "credentials"), ("upstream_proxy", "upstream_proxies")):
        name = removed.get(field)
        if name is None or name not in (edit.doc.get(section) or {}):
            continue
        targets = edit.doc.get("targets") or {}
        others = [t for t, other in targets.items() if other.get(field) == name]
        if others:
            kept.append(f"{SECTION_WORDS[section]} '{name}': used by target {_names(others)}")
        else:
            edit.remove(section, name)
            pruned.append((section, name))
    return pruned, kept


def _names(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)
