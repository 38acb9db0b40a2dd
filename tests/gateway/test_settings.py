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
        assert settings.db_path() == tmp_path / "keyswap.db"
        tctx.configure(settings, keyswap_db=str(tmp_path / "other.db"))
        assert settings.db_path() == tmp_path / "other.db"


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
    ],
)
def test_wrong_mitmproxy_options_fail_loudly(options: dict[str, object], message: str) -> None:
    settings = Settings()
    with taddons.context(Proxyserver(), settings) as tctx:
        with pytest.raises(exceptions.OptionsError, match=message):
            tctx.configure(settings, **options)


def test_mode_must_be_reverse() -> None:
    from keyswap.gateway.settings import mode_problem

    assert mode_problem(REVERSE) is None
    assert "keyswap runs in reverse mode" in (mode_problem(["regular"]) or "")
    assert "keyswap runs in reverse mode" in (mode_problem(["upstream:http://x:1"]) or "")


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
