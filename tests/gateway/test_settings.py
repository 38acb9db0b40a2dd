from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons

from keyswap.gateway.settings import Settings

GOOD = """\
version: 1
credentials:
  k: { type: bearer, token: "${env:HOME}" }
targets:
  t: { base_url: "https://x.example", credential: k }
proxies:
  p: { target: t }
"""
REVERSE = ["reverse:http://unused.invalid@8080"]


def test_loads_the_config(tmp_path: Path) -> None:
    (tmp_path / "k.yaml").write_text(GOOD)
    settings = Settings()
    with taddons.context(Proxyserver(), settings) as tctx:
        tctx.configure(settings, mode=REVERSE, keyswap_config=str(tmp_path / "k.yaml"))
        assert settings.runtime.routes.match("/api/p/x") == ("p", "/api/p", "/x")
        assert settings.db_path() == str(tmp_path / "keyswap.db")
        tctx.configure(settings, keyswap_db=str(tmp_path / "other.db"))
        assert settings.db_path() == str(tmp_path / "other.db")


def test_invalid_config_is_an_options_error(tmp_path: Path) -> None:
    (tmp_path / "k.yaml").write_text("version: 1\nproxies:\n  p: { target: nowhere }\n")
    settings = Settings()
    with taddons.context(Proxyserver(), settings) as tctx:
        with pytest.raises(exceptions.OptionsError, match="target 'nowhere' is not defined"):
            tctx.configure(settings, mode=REVERSE, keyswap_config=str(tmp_path / "k.yaml"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": REVERSE, "keep_host_header": True}, "unset keep_host_header"),
        ({"mode": REVERSE, "stream_large_bodies": "1m"}, "unset stream_large_bodies"),
        ({"mode": ["regular@8081"], "ignore_hosts": ["pypi.org"]}, "unset ignore_hosts"),
        ({"mode": ["regular@8081"], "allow_hosts": ["x"]}, "unset allow_hosts"),
        ({"mode": ["regular@8081"], "tcp_hosts": ["x"]}, "unset tcp_hosts"),
    ],
)
def test_wrong_mitmproxy_options_fail_loudly(options: dict[str, object], message: str) -> None:
    settings = Settings()
    with taddons.context(Proxyserver(), settings) as tctx:
        with pytest.raises(exceptions.OptionsError, match=message):
            tctx.configure(settings, **options)


def test_mode_must_be_reverse_or_regular() -> None:
    from keyswap.gateway.settings import mode_problem

    assert mode_problem(REVERSE) is None
    assert mode_problem(["regular@8081"]) is None  # forward mode
    assert mode_problem([*REVERSE, "regular@8081"]) is None
    assert "no other" in (mode_problem(["upstream:http://x:1"]) or "")
    assert "no other" in (mode_problem(["socks5"]) or "")
    assert "no other" in (mode_problem(["transparent"]) or "")


def test_sets_lazy_connections() -> None:
    settings = Settings()
    with taddons.context(Proxyserver(), settings) as tctx:
        tctx.configure(settings, mode=REVERSE, connection_strategy="eager")
        assert tctx.options.connection_strategy == "lazy"


def test_reload_keeps_the_old_config_and_tells_listeners(tmp_path: Path) -> None:
    path = tmp_path / "k.yaml"
    path.write_text(GOOD)
    settings = Settings()
    seen: list[tuple[bool, list[str]]] = []
    settings.on_reload.append(lambda loaded, errors: seen.append((loaded is not None, errors)))
    with taddons.context(Proxyserver(), settings) as tctx:
        tctx.configure(settings, mode=REVERSE, keyswap_config=str(path))
        first = settings.runtime
        path.write_text(GOOD + "  broken: [\n")
        settings.reload()
        assert settings.runtime is first
        assert seen[-1][0] is False and "YAML syntax error" in seen[-1][1][0]
        path.write_text(GOOD.replace("proxies:\n", "proxies:\n  q: { target: t }\n"))
        settings.reload()
        assert settings.runtime is not first and seen[-1] == (True, [])
        assert settings.runtime.routes.match("/api/q") is not None


@pytest.mark.parametrize(
    ("mode", "host", "port", "changes"),
    [
        ("reverse:http://unused.invalid@9000", "", None, {"listen_port": 9000}),
        ("reverse:http://unused.invalid@127.0.0.2:9000", "127.0.0.2", 9000, {}),
        (
            "reverse:http://unused.invalid@[::1]:9000",
            "127.0.0.1",
            8080,
            {"listen_host": "[::1]", "listen_port": 9000},  # as mitmproxy reads the mode
        ),
        ("reverse:http://unused.invalid", "127.0.0.1", 9000, {}),  # the options say it
        ("nonsense:", "", None, {}),
    ],
)
def test_mitmweb_s_status_bar_shows_the_listen_address(
    mode: str, host: str, port: int | None, changes: dict[str, object]
) -> None:
    from keyswap.gateway.settings import listen_options

    assert listen_options([mode], host, port) == changes


def test_the_listen_options_follow_the_mode() -> None:
    settings = Settings()
    with taddons.context(Proxyserver(), settings) as tctx:
        tctx.configure(settings, mode=["reverse:http://unused.invalid@127.0.0.1:9123"])
        assert (tctx.options.listen_host, tctx.options.listen_port) == ("127.0.0.1", 9123)


def test_mitmweb_shows_the_decision_column_unless_columns_were_chosen() -> None:
    from mitmproxy.tools.web.webaddons import WebAddon

    from keyswap.gateway.settings import with_decision_column

    default = ["tls", "icon", "path", "method", "status", "size", "time"]
    assert with_decision_column(default) == [*default[:5], "comment", *default[5:]]
    assert with_decision_column(["path", "comment"]) == ["path", "comment"]
    settings, web = Settings(), WebAddon()
    with taddons.context(Proxyserver(), web, settings) as tctx:
        tctx.configure(settings, mode=REVERSE)  # the first configure sees every option
        settings.configure({"web_columns"})
        assert "comment" in tctx.options.web_columns
        tctx.configure(settings, web_columns=["path", "status"])  # the user's choice
        assert tctx.options.web_columns == ["path", "status"]


def test_raw_tcp_is_turned_off_so_no_bytes_pass_the_stages_unchecked() -> None:
    settings = Settings()
    with taddons.context(Proxyserver(), settings) as tctx:
        tctx.configure(settings, mode=["regular@8081"], rawtcp=True)
        assert tctx.options.rawtcp is False
