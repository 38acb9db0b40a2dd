import pytest

from keyswap.gateway.routes import RouteTable

TABLE = RouteTable(
    [("/api/crm", "crm"), ("/api/crm-prod", "prod"), ("/a/b/c", "deep"), ("/a", "a")]
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/crm", ("crm", "/api/crm", "")),
        ("/api/crm/x/y", ("crm", "/api/crm", "/x/y")),
        ("/api/crm-prod/x", ("prod", "/api/crm-prod", "/x")),
        ("/api/crm-prodx", None),
        ("/api/crmx/y", None),
        ("/a/b/c/d", ("deep", "/a/b/c", "/d")),
        ("/a/b/x", ("a", "/a", "/b/x")),
        ("/", None),
        ("", None),
    ],
)
def test_longest_whole_segment_match(path: str, expected: tuple[str, str, str] | None) -> None:
    assert TABLE.match(path) == expected


def test_root_route_catches_everything() -> None:
    assert RouteTable([("/", "all")]).match("/x/y") == ("all", "/", "/x/y")


def test_first_claim_wins() -> None:
    assert RouteTable([("/x", "one"), ("/x", "two")]).match("/x") == ("one", "/x", "")
