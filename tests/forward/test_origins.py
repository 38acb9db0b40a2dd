import pytest

from keyswap.config.model import Config
from keyswap.forward.origins import ForwardIndex, split_origin


def config(**forward: object) -> Config:
    return Config.model_validate(
        {
            "credentials": {"k": {"type": "bearer", "token": "secret-value"}},
            "targets": {
                "openai": {"base_url": "https://API.openai.com/v1", "credential": "k"},
                "maps": {
                    "base_url": "http://maps.example:8080",
                    "credential": "k",
                    "allowed_hosts": ["https://tiles.example"],
                },
            },
            "proxies": {
                "chat": {"target": "openai"},
                "batch": {"target": "openai"},
                "maps": {"target": "maps"},
            },
            "forward": forward,
        }
    )


def test_each_target_origin_lists_the_proxies_whose_target_serves_it() -> None:
    index = ForwardIndex.of(config())
    assert index.proxies_for("https://api.openai.com") == ("chat", "batch")
    assert index.proxies_for("http://maps.example:8080") == ("maps",)
    assert index.proxies_for("https://tiles.example") == ("maps",)  # allowed_hosts
    assert index.proxies_for("http://api.openai.com") == ()  # another scheme, another origin
    assert index.proxies_for("https://api.openai.com:8443") == ()


def test_a_connect_is_intercepted_only_to_a_target_origins_host_and_port() -> None:
    index = ForwardIndex.of(config())
    assert index.intercepts("api.openai.com", 443)
    assert index.intercepts("maps.example", 8080)
    assert not index.intercepts("api.openai.com", 80)
    assert not index.intercepts("evil.example", 443)


def test_passthrough_names_hosts_and_domains_never_their_parents() -> None:
    index = ForwardIndex.of(config(passthrough=["PyPI.org.", "*.pythonhosted.org"]))
    assert index.passes_through("pypi.org")
    assert index.passes_through("files.pythonhosted.org")
    assert not index.passes_through("pythonhosted.org")
    assert not index.passes_through("evilpypi.org")
    assert not index.passes_through("pypi.org.evil.example")
    assert not index.passes_through("xpythonhosted.org")


@pytest.mark.parametrize(
    "bad",
    [
        *("https://pypi.org", "pypi.org:443", "pypi.org/simple", "*", "*.*.org", "a..b", "py pi"),
        *("*.com", "*.0.0.1"),  # a whole top-level domain, an address pattern
    ],
)
def test_a_passthrough_entry_is_a_host_name(bad: str) -> None:
    with pytest.raises(ValueError, match="is not a host name"):
        config(passthrough=[bad])


def test_split_origin_fills_in_the_default_port() -> None:
    assert split_origin("https://Example.org") == ("https", "example.org", 443)
    assert split_origin("http://[::1]:8080/x") == ("http", "::1", 8080)
