from keyswap.state.store import new_request_id


def test_request_ids_sort_by_time_and_are_unique() -> None:
    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(len(i) == 26 for i in ids)
    assert sorted(ids, key=lambda i: i[:12]) == ids
