import pytest

from keyswap.state import store
from keyswap.state.backends import Backend
from keyswap.state.queries import audit as audit_entries
from keyswap.state.store import audit, new_request_id


def test_request_ids_sort_by_time_and_are_unique() -> None:
    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(len(i) == 26 for i in ids)
    assert sorted(ids, key=lambda i: i[:12]) == ids


def test_audit_rows_are_numbered_in_order(backend: Backend) -> None:
    with backend.session() as session:
        audit(session, "edit", "proxies.a", {"set": {"active": False}}, "ana")
        audit(session, "delete", "proxies.a", {}, None)
        entries = audit_entries(session)
    first, second = entries
    assert (first["id"], first["action"], first["actor"]) == (1, "edit", "ana")
    assert second["id"] == 2 and second["actor"]  # the OS user
    assert first["detail"] == {"set": {"active": False}}


def test_unix_reads_back_what_iso_writes() -> None:
    for ts in (0.0, 1_800_000_000.125, 1_796_048_390.999):
        assert store.unix(store.iso(ts)) == pytest.approx(ts, abs=0.001)
