"""Read, substitute, validate and cross-check a config file; watch it for changes.

Every problem is reported at once, each naming the file, the YAML line, the
resource path (`proxies.crm-prod.target`) and what to fix. A failed reload keeps
the previous config: `ConfigSource.poll()` raises and `current` stays as it was.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from keyswap.config.model import Config, Proxy
from keyswap.config.substitution import Resolver, SubstitutionError, is_indirect, params_used
from keyswap.config.yaml12 import SafeLoader12

Key = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One error or warning about the config file."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The config file is invalid; `problems` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config with what it was loaded from."""

    config: Config
    path: Path
    digest: str
    loaded_at: float
    warnings: list[Problem] = field(default_factory=list)


def load_config(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> LoadedConfig:
    """Load and validate `path`; raise `ConfigError` with every problem found."""
    return _Load(Path(path), os.environ if environ is None else environ).run()[0]


class _Load:
    """One load of one file: collects problems as it goes."""

    def __init__(self, path: Path, environ: Mapping[str, str]) -> None:
        self.path = path
        self.environ = environ
        self.lines: dict[Key, int] = {}
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.resolver = Resolver({}, environ, path.parent)

    def error(self, key: Key, message: str) -> None:
        self.problems.append(Problem(str(self.path), self.line(key), _dotted(key), message))

    def warn(self, key: Key, message: str) -> None:
        self.warnings.append(Problem(str(self.path), self.line(key), _dotted(key), message))

    def line(self, key: Key) -> int | None:
        while key and key not in self.lines:
            key = key[:-1]
        return self.lines.get(key)

    def fail(self) -> ConfigError:
        return ConfigError(self.problems)

    def run(self) -> tuple[LoadedConfig, set[Path]]:
        try:
            data = self.path.read_bytes()
        except OSError as e:
            self.error((), f"cannot read the config file: {e.strerror}")
            raise self.fail() from None
        raw = self.parse(data)
        resolved = self.substitute(raw)
        if self.problems:
            raise self.fail()
        try:
            config = Config.model_validate(resolved)
        except ValidationError as e:
            for err in e.errors():
                self.error(_data_key(raw, err["loc"]), _explain(err))
            raise self.fail() from None
        self.cross_check(config)
        self.warn_about(config, raw)
        if self.problems:
            raise self.fail()
        digest = hashlib.sha256(data).hexdigest()
        loaded = LoadedConfig(config, self.path, digest, time.time(), self.warnings)
        return loaded, set(self.resolver.files_read)

    # --- YAML ---------------------------------------------------------------------

    def parse(self, data: bytes) -> dict[str, Any]:
        try:
            loader = SafeLoader12(data)  # YAML 1.2, as the command line writes
            try:
                node = loader.get_single_node()
                if node is None:
                    self.error((), "the file is empty; start from config/keyswap.yaml")
                    raise self.fail()
                self.index(node, ())
                if self.problems:
                    raise self.fail()
                document = loader.construct_document(node)
            finally:
                loader.dispose()
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark else None
            what = str(e.problem or e.context)
            if e.context and e.context_mark and e.context_mark.line + 1 != line:
                what += f" ({e.context.removeprefix('while scanning ')} started at line "
                what += f"{e.context_mark.line + 1})"
            self.problems.append(Problem(str(self.path), line, "", f"YAML syntax error: {what}"))
            raise self.fail() from None
        except yaml.YAMLError as e:
            self.error((), f"YAML error: {e}")
            raise self.fail() from None
        if not isinstance(document, dict):
            self.error((), "the top level must be a mapping (version:, targets:, proxies:, ...)")
            raise self.fail()
        return document

    def index(self, node: yaml.Node, key: Key) -> None:
        """Record the line of every key, and refuse duplicate keys (YAML keeps the last)."""
        self.lines.setdefault(key, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in node.value:
                name = str(k.value)
                child = (*key, name)
                if k.tag != "tag:yaml.org,2002:str":
                    self.lines[child] = k.start_mark.line + 1
                    kind = k.tag.rsplit(":", 1)[-1]
                    kind = f"an {kind}" if kind == "int" else f"a {kind}"
                    self.error(child, f"YAML reads this key as {kind}; quote it: '{name}'")
                if name in seen:
                    self.lines[child] = k.start_mark.line + 1
                    self.error(child, "duplicate key; YAML would silently keep only the last one")
                seen.add(name)
                self.lines.setdefault(child, k.start_mark.line + 1)
                self.index(v, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.index(item, (*key, i))

    # --- substitution -------------------------------------------------------------

    def substitute(self, raw: dict[str, Any]) -> dict[str, Any]:
        env_value = raw.get("environment", "${env:KEYSWAP_ENV:-dev}")
        environment = self.scalar(env_value, ("environment",), allow_params=False)
        params_all = raw.get("params") or {}
        params: dict[str, Any] = {}
        if isinstance(params_all, dict) and isinstance(environment, str):
            chosen = params_all.get(environment)
            if params_all and chosen is None:
                known = ", ".join(sorted(map(str, params_all))) or "none"
                self.error(
                    ("environment",), f"no params for environment '{environment}' (known: {known})"
                )
            elif isinstance(chosen, dict):
                params = {
                    str(k): self.scalar(v, ("params", environment, str(k)), allow_params=False)
                    for k, v in chosen.items()
                }
        self.resolver.params = params
        self.resolver.environment = str(environment)
        out = {k: self.walk(v, (k,)) for k, v in raw.items() if k not in ("environment", "params")}
        out["environment"] = environment
        if "params" in raw:
            out["params"] = raw["params"]  # kept raw: other environments' env vars may be unset
        return out

    def walk(self, value: Any, key: Key) -> Any:
        if isinstance(value, dict):
            return {k: self.walk(v, (*key, str(k))) for k, v in value.items()}
        if isinstance(value, list):
            return [self.walk(v, (*key, i)) for i, v in enumerate(value)]
        return self.scalar(value, key)

    def scalar(self, value: Any, key: Key, *, allow_params: bool = True) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.resolver.resolve(value, allow_params=allow_params)
        except SubstitutionError as e:
            self.error(key, str(e))
            return value

    # --- cross-checks -------------------------------------------------------------

    def cross_check(self, config: Config) -> None:
        for name, target in config.targets.items():
            if target.credential not in config.credentials:
                self.error(
                    ("targets", name, "credential"),
                    f"credential '{target.credential}' is not defined under credentials "
                    f"(known: {_known(config.credentials)})",
                )
            if (
                target.upstream_proxy is not None
                and target.upstream_proxy not in config.upstream_proxies
            ):
                self.error(
                    ("targets", name, "upstream_proxy"),
                    f"upstream proxy '{target.upstream_proxy}' is not defined under "
                    f"upstream_proxies (known: {_known(config.upstream_proxies)}); "
                    "keyswap never falls back to a direct connection",
                )
        claimed: dict[str, str] = {}
        digests: dict[str, str] = {}
        for pid, proxy in config.proxies.items():
            if proxy.target not in config.targets:
                self.error(
                    ("proxies", pid, "target"),
                    f"target '{proxy.target}' is not defined under targets "
                    f"(known: {_known(config.targets)})",
                )
            for i, route in enumerate(config.routes_of(pid)):
                other = claimed.get(route)
                if other is not None and _may_overlap(config.proxies[other], proxy):
                    self.error(
                        ("proxies", pid, "routes", i),
                        f"route {route} is already claimed by proxy '{other}'",
                    )
                claimed.setdefault(route, pid)
            seen_ids: set[str] = set()
            for i, token in enumerate(proxy.tokens):
                if token.id in seen_ids:
                    self.error(
                        ("proxies", pid, "tokens", i, "id"), f"token id '{token.id}' is used twice"
                    )
                seen_ids.add(token.id)
                owner = digests.setdefault(token.sha256, pid)
                if owner != pid:
                    self.error(
                        ("proxies", pid, "tokens", i, "sha256"),
                        f"this token also belongs to proxy '{owner}'; a token identifies one proxy",
                    )
            self.check_region(config, pid, proxy)

    def check_region(self, config: Config, pid: str, proxy: Proxy) -> None:
        if config.region is None or not config.serves(pid):
            return
        target = config.targets.get(proxy.target)
        if target is None:
            return
        used: list[tuple[Key, str | None]] = [(("targets", proxy.target, "region"), target.region)]
        credential = config.credentials.get(target.credential)
        if credential is not None:
            used.append((("credentials", target.credential, "region"), credential.region))
        upstream = config.upstream_proxies.get(target.upstream_proxy or "")
        if upstream is not None:
            used.append(
                (("upstream_proxies", target.upstream_proxy or "", "region"), upstream.region)
            )
        for key, region in used:
            if region is not None and region != config.region:
                self.error(
                    key,
                    f"is in region '{region}' but proxy '{pid}' is served in region "
                    f"'{config.region}'; all components must be in the same region",
                )

    # --- warnings -----------------------------------------------------------------

    def warn_about(self, config: Config, raw: dict[str, Any]) -> None:
        for pid, proxy in config.proxies.items():
            if "*" in proxy.allowed_origins:
                self.warn(
                    ("proxies", pid, "allowed_origins"),
                    "'*' lets any web page call this proxy with a token it obtained; list origins",
                )
            if not proxy.tokens:
                self.warn(("proxies", pid, "tokens"), "no tokens: every request will be refused")
        self.warn_unused(config)
        params = _env_params(raw, config.environment)
        for key in _secret_keys(config, ()):
            text = _at(raw, key)
            if not isinstance(text, str):
                continue
            sources = [text, *(str(params.get(p, "")) for p in params_used(text))]
            if not any(is_indirect(s) for s in sources):
                self.warn(
                    key,
                    "a secret is written in the file; use ${env:NAME} or ${file:PATH} "
                    "so it stays out of version control",
                )

    def warn_unused(self, config: Config) -> None:
        """Name targets no proxy uses, and credentials and upstream proxies no used target
        uses: left behind by a deleted proxy, they can still stop the gateway (an unset
        ${env:...}) for something that serves nothing."""
        used = {proxy.target for proxy in config.proxies.values()}
        for name in config.targets:
            if name not in used:
                self.warn(("targets", name), "no proxy uses this target")
        credentials = {t: target.credential for t, target in config.targets.items()}
        upstreams = {t: target.upstream_proxy for t, target in config.targets.items()}
        for section, word, names, refs in (
            ("credentials", "credential", config.credentials, credentials),
            ("upstream_proxies", "upstream proxy", config.upstream_proxies, upstreams),
        ):
            for name in names:
                users = [t for t, ref in refs.items() if ref == name]
                if not users:
                    self.warn((section, name), f"no target uses this {word}")
                elif not used.intersection(users):
                    unused = ", ".join(f"'{t}'" for t in users)
                    plural = "s" * (len(users) > 1)
                    self.warn((section, name), f"used only by unused target{plural} {unused}")


class ConfigSource:
    """A config file the gateway serves from, reloaded when it (or a ${file:}) changes."""

    def __init__(
        self, path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
    ) -> None:
        self.path = Path(path)
        self.environ = os.environ if environ is None else environ
        self._files: set[Path] = set()
        self._stamp = self._read_stamp(self._files)
        self.current = self._load(self._stamp)

    def poll(self) -> LoadedConfig | None:
        """Reload if the file changed: the new config, None when unchanged; raises
        `ConfigError` (and keeps `current`) when the changed file is invalid."""
        stamp = self._read_stamp(self._files)
        if stamp == self._stamp:
            return None
        self._stamp = stamp  # a broken file is reported once, not at every poll
        self.current = self._load(stamp)
        return self.current

    def _load(self, stamp_before: tuple[tuple[str, int, int, int], ...]) -> LoadedConfig:
        # The stamp is taken before reading, so a write during the load is seen next poll.
        loaded, files = _Load(self.path, self.environ).run()
        if files != self._files:
            self._files = files
            self._stamp = self._read_stamp(files)
        else:
            self._stamp = stamp_before
        return loaded

    def _read_stamp(self, files: set[Path]) -> tuple[tuple[str, int, int, int], ...]:
        out = []
        for p in sorted({self.path, *files}):
            try:
                st = p.stat()
                out.append((str(p), st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((str(p), -1, -1, -1))
        return tuple(out)


# --- helpers ------------------------------------------------------------------------


def _dotted(key: Key) -> str:
    return ".".join(f"[{k}]" if isinstance(k, int) else k for k in key).replace(".[", "[")


def _known(section: Mapping[str, object]) -> str:
    return ", ".join(sorted(section)) or "none defined"


def _may_overlap(a: Proxy, b: Proxy) -> bool:
    """Two proxies can serve at the same time unless their environments are disjoint."""
    if a.environments is None or b.environments is None:
        return True
    return bool(set(a.environments) & set(b.environments))


def _data_key(raw: Any, loc: tuple[str | int, ...]) -> Key:
    """Map a pydantic error location onto the YAML's keys, skipping union tags."""
    key: list[str | int] = []
    node = raw
    for part in loc:
        in_dict = isinstance(node, dict) and part in node
        if in_dict or (isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            node = node[part]
            key.append(part)
        elif isinstance(node, dict) and isinstance(part, str) and not _is_tag(part, node):
            key.append(part)  # a missing or unknown field: name it
            node = None
    return tuple(key)


def _is_tag(part: str, node: dict[str, Any]) -> bool:
    return node.get("type") == part or "[" in part or part.startswith("function-")


def _explain(err: Any) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field (check the spelling; `keyswap schema` lists the fields)"
    if kind == "union_tag_invalid":
        return f"{msg}"
    return str(msg).removeprefix("Value error, ")


def _secret_keys(model: BaseModel, key: Key) -> Iterator[Key]:
    """The location of every secret value in the validated config."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        yield from _secret_values(value, (*key, name))


def _secret_values(value: object, key: Key) -> Iterator[Key]:
    if isinstance(value, SecretStr):
        yield key
    elif isinstance(value, BaseModel):
        yield from _secret_keys(value, key)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _secret_values(v, (*key, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _secret_values(v, (*key, i))


def _at(raw: Any, key: Key) -> Any:
    for part in key:
        if isinstance(raw, dict):
            raw = raw.get(part)
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return None
    return raw


def _env_params(raw: dict[str, Any], environment: str) -> dict[str, Any]:
    params = raw.get("params")
    chosen = params.get(environment) if isinstance(params, dict) else None
    return chosen if isinstance(chosen, dict) else {}
