import os
import time
from pathlib import Path

import pytest

from keyswap.config.loader import ConfigError, ConfigSource, load_config

DIGEST = "a" * 64

GOOD = (
    """\
version: 1
environment: ${env:KS_ENV:-dev}
params:
  dev:  { host: 127.0.0.1, port: 3128 }
  prod: { host: proxy.corp.example, port: "${env:PROD_PORT}" }
upstream_proxies:
  corp:
    host: ${host}
    port: ${port}
    auth: { type: basic, user: svc, password: "${env:CORP_PW}" }
credentials:
  key: { type: bearer, token: "${env:API_KEY}" }
targets:
  api: { base_url: "https://api.example.com", credential: key, upstream_proxy: corp }
proxies:
  p:
    target: api
    tokens: [{ id: web, sha256: %s }]
"""
    % DIGEST
)

ENV = {"CORP_PW": "pw", "API_KEY": "k"}


def test_loads_and_substitutes(write_config) -> None:
    loaded = load_config(write_config(GOOD), ENV)
    corp = loaded.config.upstream_proxies["corp"]
    assert (corp.host, corp.port) == ("127.0.0.1", 3128)
    assert loaded.config.environment == "dev"
    assert len(loaded.digest) == 64
    assert loaded.warnings == []


def test_params_select_per_environment(write_config) -> None:
    loaded = load_config(write_config(GOOD), {**ENV, "KS_ENV": "prod", "PROD_PORT": "8443"})
    corp = loaded.config.upstream_proxies["corp"]
    assert (corp.host, corp.port) == ("proxy.corp.example", 8443)


def test_other_environments_params_are_not_resolved(write_config) -> None:
    # PROD_PORT is unset, which only matters when serving prod.
    assert load_config(write_config(GOOD), ENV).config.environment == "dev"
    with pytest.raises(ConfigError, match="PROD_PORT is not set"):
        load_config(write_config(GOOD), {**ENV, "KS_ENV": "prod"})


def test_unknown_environment_is_named(write_config) -> None:
    with pytest.raises(
        ConfigError, match=r"no params for environment 'stage' \(known: dev, prod\)"
    ):
        load_config(write_config(GOOD), {**ENV, "KS_ENV": "stage"})


def test_port_from_env_is_validated_as_a_port(write_config) -> None:
    with pytest.raises(ConfigError, match="upstream_proxies.corp.port: a port is a number"):
        load_config(write_config(GOOD), {**ENV, "KS_ENV": "prod", "PROD_PORT": "99999"})
    with pytest.raises(
        ConfigError, match="upstream_proxies.corp.port: Input should be a valid integer"
    ):
        load_config(write_config(GOOD), {**ENV, "KS_ENV": "prod", "PROD_PORT": "eighty"})


def test_every_error_is_reported_at_once(write_config) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write_config(GOOD), {})
    messages = [str(p) for p in e.value.problems]
    assert len(messages) == 2
    assert (
        "keyswap.yaml:10: upstream_proxies.corp.auth.password: environment variable CORP_PW"
        in messages[0]
    )
    assert "keyswap.yaml:12: credentials.key.token: environment variable API_KEY" in messages[1]


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.yaml", {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("version: 2\n", "version: Input should be 1"),
        ("credentials:\n  c: { type: magic }\n", "credentials.c: Input tag 'magic'"),
        ("credentials:\n  c: { type: bearer }\n", "credentials.c.token: is required"),
    ],
)
def test_bad_documents(write_config, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(text), {})


def test_same_route_in_disjoint_environments_is_fine(write_config) -> None:
    text = GOOD.replace(
        "\nproxies:\n",
        "\nproxies:\n  a: { target: api, routes: [/x], environments: [dev] }\n"
        "  b: { target: api, routes: [/x], environments: [prod] }\n",
    )
    assert load_config(write_config(text), ENV)


def test_token_shared_by_two_proxies_is_an_error(write_config) -> None:
    text = GOOD + "  q:\n    target: api\n    tokens: [{ id: other, sha256: %s }]\n" % DIGEST
    with pytest.raises(ConfigError, match="also belongs to proxy 'p'"):
        load_config(write_config(text), ENV)


def test_warnings(write_config) -> None:
    text = GOOD.replace('"${env:API_KEY}"', "sk_live_literal").replace(
        "    target: api\n", "    target: api\n    allowed_origins: ['*']\n"
    )
    loaded = load_config(write_config(text), ENV)
    found = [str(w) for w in loaded.warnings]
    assert any("credentials.key.token: a secret is written in the file" in w for w in found)
    assert any("proxies.p.allowed_origins: '*' lets any web page" in w for w in found)


def test_secret_from_param_that_reads_env_is_not_a_literal(write_config) -> None:
    text = GOOD.replace(
        "dev:  { host: 127.0.0.1,", 'dev:  { tok: "${env:API_KEY}", host: 127.0.0.1,'
    )
    text = text.replace('token: "${env:API_KEY}"', 'token: "${tok}"')
    assert load_config(write_config(text), ENV).warnings == []


def touch_later(path: Path, text: str) -> None:
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_source_reloads_good_changes_and_keeps_the_old_config_on_bad_ones(write_config) -> None:
    path = write_config(GOOD)
    source = ConfigSource(path, ENV)
    first = source.current
    assert source.poll() is None

    touch_later(path, GOOD.replace("api.example.com", "api2.example.com"))
    reloaded = source.poll()
    assert reloaded is not None and source.current is reloaded
    assert reloaded.config.targets["api"].base_url == "https://api2.example.com"

    touch_later(path, GOOD + "  broken: [\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        source.poll()
    assert source.current is reloaded
    assert source.poll() is None  # reported once, not at every poll
    assert first.digest != reloaded.digest


def test_source_watches_secret_files(write_config, tmp_path: Path) -> None:
    (tmp_path / "key").write_text("one\n")
    path = write_config(GOOD.replace('"${env:API_KEY}"', '"${file:key}"'))
    source = ConfigSource(path, ENV)
    time.sleep(0.01)
    touch_later(tmp_path / "key", "two\n")
    reloaded = source.poll()
    assert reloaded is not None
    token = reloaded.config.credentials["key"].token
    assert token.get_secret_value() == "two"


YAML11_WORDS = (
    """\
version: 1
params:
  dev: { mode: off, flag: yes }
credentials:
  on: { type: header, name: x-mode, value: "${mode}" }
targets:
  no: { base_url: "https://api.example.com", credential: on }
proxies:
  off:
    name: on
    description: y
    target: no
    active: true
    environments: [dev, n]
    request_headers: { set: { x-flag: "${flag}", x-off: off } }
    tokens: [{ id: yes, sha256: %s }]
"""
    % DIGEST
)


def test_yaml_1_2_off_no_on_yes_are_strings_as_keys_and_values(write_config) -> None:
    config = load_config(write_config(YAML11_WORDS), {}).config
    proxy = config.proxies["off"]
    assert (proxy.name, proxy.description, proxy.target) == ("on", "y", "no")
    assert proxy.active is True and proxy.environments == ["dev", "n"]
    assert proxy.request_headers.set == {"x-flag": "yes", "x-off": "off"}
    assert proxy.tokens[0].id == "yes"
    assert config.targets["no"].credential == "on"
    assert config.params["dev"] == {"mode": "off", "flag": "yes"}


def test_keys_yaml_reads_as_other_types_are_refused_with_their_line(write_config) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write_config("version: 1\nproxies:\n  off: {target: t}\n  true: {}\n"), {})
    assert [str(p).split("keyswap.yaml:")[1] for p in e.value.problems] == [
        "4: proxies.true: YAML reads this key as a bool; quote it: 'true'"
    ]


UNUSED = (
    """\
version: 1
upstream_proxies:
  corp: { host: proxy.example, port: 3128 }
  spare: { host: spare.example, port: 3128 }
credentials:
  used: { type: bearer, token: "${env:API_KEY}" }
  orphan: { type: bearer, token: "${env:API_KEY}" }
  behind-orphan: { type: bearer, token: "${env:API_KEY}" }
targets:
  api: { base_url: "https://api.example.com", credential: used }
  left-over: { base_url: "https://old.example.com", credential: behind-orphan, upstream_proxy: corp }
proxies:
  p: { target: api, tokens: [{ id: web, sha256: %s }] }
"""
    % DIGEST
)


def test_unused_targets_credentials_and_upstream_proxies_are_warnings(write_config) -> None:
    loaded = load_config(write_config(UNUSED), ENV)
    assert [str(w).split("keyswap.yaml:")[1] for w in loaded.warnings] == [
        "11: targets.left-over: no proxy uses this target",
        "7: credentials.orphan: no target uses this credential",
        "8: credentials.behind-orphan: used only by unused target 'left-over'",
        "3: upstream_proxies.corp: used only by unused target 'left-over'",
        "4: upstream_proxies.spare: no target uses this upstream proxy",
    ]
