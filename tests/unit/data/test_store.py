"""The completion store's contract, held by both backends: SQLite and object storage (a real SeaweedFS)."""

import os
import stat
import threading
from dataclasses import replace

import pytest

from server.data import CompletionRecord, Feedback, LedgerEntry, ListQuery, Snapshot
from server.data.s3_store import S3Store
from server.data.sqlite_store import SqliteStore

T0_MS = 1_700_000_000_000
PREFIX = {"chat.completions": "chatcmpl-", "completions": "cmpl-"}


@pytest.fixture(params=["sqlite", "s3"])
def store(request, tmp_path):
    """The store on each backend: every test taking it holds for SQLite and for object storage."""
    if request.param == "sqlite":
        return SqliteStore(tmp_path / "state" / "completions.sqlite3")
    return S3Store(request.getfixturevalue("s3_url"))


def make_id(n: int, route: str = "chat.completions") -> str:
    """An id as the gateway makes one: its route's prefix, 11 hex digits of milliseconds, random hex."""
    return f"{PREFIX[route]}{T0_MS + n * 1000:011x}{n:08x}"


def at(n: int) -> float:
    """The time of the n-th answer (a second apart): its id's stamp."""
    return (T0_MS + n * 1000) / 1000


def rec(n: int, tenant: str = "acme", route: str = "chat.completions", **fields) -> CompletionRecord:
    base = dict(id=make_id(n, route), tenant=tenant, key_id="k1", route=route, model="a", version="a@1",
                created=at(n), request={"messages": [{"role": "user", "content": f"q{n}"}]},
                response={"choices": [{"message": {"content": f"a{n}"}}]}, request_id=f"req-{n}",
                usage={"prompt_tokens": n, "completion_tokens": 2}, timings={"total": 0.5})
    return CompletionRecord(**{**base, **fields})


def fb(record_id: str, key_id: str = "k1", rating: float = 1.0, created: float = 0.0,
       tenant: str = "acme") -> Feedback:
    return Feedback(record_id, tenant, key_id, "a@1", rating, None, "ok", created or at(0) + 0.5)


def add(store, *records: CompletionRecord) -> None:
    store.add(records, [r.ledger for r in records])


def ids(records) -> list[str]:
    return [r.id for r in records]


def page_ids(store, tenant: str = "acme", **query) -> tuple[list[str], bool]:
    found, more = store.page(tenant, ListQuery(**query))
    return ids(found), more


def test_add_get_and_ledger_round_trip(store):
    record = rec(1, user="u1", metadata={"topic": "billing"})
    answer_only = LedgerEntry(make_id(2), "acme", "k2", None, at(2))
    store.add([record], [record.ledger, answer_only])
    assert store.get("acme", record.id) == record
    assert store.ledger("acme", record.id) == LedgerEntry(record.id, "acme", "k1", "a@1", at(1))
    assert store.ledger("acme", answer_only.id) == answer_only
    assert store.get("acme", answer_only.id) is None
    assert store.get("acme", make_id(9)) is None
    again = replace(record, metadata={"topic": "refunds"})
    add(store, again)  # a batch written twice: the later write stands
    assert store.get("acme", record.id) == again
    assert page_ids(store, metadata={"topic": "billing"}) == ([], False)
    assert page_ids(store, metadata={"topic": "refunds"}) == ([record.id], False)


def test_another_tenants_id_reads_as_missing_everywhere(store):
    mine, theirs = rec(1, metadata={"p": "1"}), rec(2, tenant="other", metadata={"p": "1"}, user="u")
    add(store, mine, theirs)
    store.put_feedback(fb(theirs.id, tenant="other"))
    assert store.get("acme", theirs.id) is None
    assert store.ledger("acme", theirs.id) is None
    assert page_ids(store) == ([mine.id], False)
    assert page_ids(store, metadata={"p": "1"}) == ([mine.id], False)
    assert page_ids(store, after=theirs.id) == ([], False)
    assert store.set_metadata("acme", theirs.id, {"x": "y"}) is None
    assert store.delete("acme", theirs.id) is False
    assert store.delete_feedback("acme", theirs.id, None) == 0
    assert store.feedback("acme") == []
    assert store.erase("acme", user="u") == []
    assert store.expire("acme", at(10)) == 1
    assert store.get("other", theirs.id) == theirs
    assert [f.id for f in store.feedback("other", record_ids=[theirs.id])] == [theirs.id]


def test_list_filters(store):
    records = [
        rec(0, model="a", key_id="k1", metadata={"topic": "billing", "lang": "en"}),
        rec(1, model="b", key_id="k1", metadata={"topic": "billing", "lang": "de"}),
        rec(2, model="a", key_id="k2", metadata={"topic": "support", "lang": "en"}),
        rec(3, model="a", key_id=None, metadata={}),
        rec(4, route="completions", model="a", key_id="k1", metadata={"topic": "billing"}),
        rec(5, model="a/b", key_id="k1", metadata={"topic": "../billing"}),
    ]
    add(store, *records)
    r = ids(records)
    assert page_ids(store) == ([r[0], r[1], r[2], r[3], r[5]], False)
    assert page_ids(store, route="completions") == ([r[4]], False)
    assert page_ids(store, model="a") == ([r[0], r[2], r[3]], False)
    assert page_ids(store, model="a/b") == ([r[5]], False)
    assert page_ids(store, key_id="k1") == ([r[0], r[1], r[5]], False)
    assert page_ids(store, key_id="k1", model="a") == ([r[0]], False)
    assert page_ids(store, metadata={"topic": "billing"}) == ([r[0], r[1]], False)
    assert page_ids(store, metadata={"topic": "billing", "lang": "en"}) == ([r[0]], False)
    assert page_ids(store, metadata={"topic": "../billing"}) == ([r[5]], False)
    assert page_ids(store, metadata={"topic": "billing"}, route="completions") == ([r[4]], False)
    assert page_ids(store, metadata={"topic": "support"}, key_id="k1") == ([], False)
    assert page_ids(store, model="c") == ([], False)


def test_several_filters_page_through_their_intersection(store):
    records = [rec(n, key_id="k1" if n % 2 == 0 else "k2",
                   metadata={"env": "prod", "case": "x" if n in (3, 17, 28, 29) else "y"}) for n in range(30)]
    add(store, *records)
    r = ids(records)
    both = {"env": "prod", "case": "x"}
    assert page_ids(store, metadata=both, limit=2) == ([r[3], r[17]], True)
    assert page_ids(store, metadata=both, limit=2, after=r[17]) == ([r[28], r[29]], False)
    assert page_ids(store, metadata={"case": "x"}, key_id="k1") == ([r[28]], False)
    assert page_ids(store, metadata={"case": "x"}, key_id="k2", limit=1, order="desc") == ([r[29]], True)
    assert page_ids(store, metadata={"case": "x"}, key_id="k2", limit=1, order="desc", after=r[29]) == ([r[17]], True)
    assert page_ids(store, metadata={"case": "x"}, key_id="k2", limit=1, order="desc", after=r[17]) == ([r[3]], False)
    assert page_ids(store, key_id="k1", model="a", limit=3, after=r[10]) == ([r[12], r[14], r[16]], True)


def test_after_limit_order_paging(store):
    records = [rec(n, model="a" if n % 2 else "b") for n in range(7)]
    add(store, *records)
    r = ids(records)
    assert page_ids(store, limit=3) == (r[0:3], True)
    assert page_ids(store, limit=3, after=r[2]) == (r[3:6], True)
    assert page_ids(store, limit=3, after=r[5]) == ([r[6]], False)
    assert page_ids(store, limit=3, after=r[6]) == ([], False)
    assert page_ids(store, limit=7) == (r, False)
    assert page_ids(store, limit=3, order="desc") == ([r[6], r[5], r[4]], True)
    assert page_ids(store, limit=3, order="desc", after=r[4]) == ([r[3], r[2], r[1]], True)
    assert page_ids(store, limit=3, order="desc", after=r[1]) == ([r[0]], False)
    # `after` need not match the filters: the page starts just past it
    assert page_ids(store, model="a", limit=2, after=r[2]) == ([r[3], r[5]], False)
    assert page_ids(store, model="b", limit=1, order="desc", after=r[5]) == ([r[4]], True)
    # an id that is no record of the tenant and route: an empty page
    assert page_ids(store, after=make_id(99)) == ([], False)
    assert page_ids(store, after=r[3], route="completions") == ([], False)
    store.delete("acme", r[3])
    assert page_ids(store, after=r[3]) == ([], False)


def test_set_metadata_replaces_pairs_and_their_filters(store):
    record = rec(1, metadata={"topic": "billing", "lang": "en"})
    add(store, record, rec(2, metadata={"lang": "en"}))
    changed = store.set_metadata("acme", record.id, {"topic": "refunds"})
    assert changed == replace(record, metadata={"topic": "refunds"})
    assert store.get("acme", record.id) == changed
    assert page_ids(store, metadata={"topic": "billing"}) == ([], False)
    assert page_ids(store, metadata={"lang": "en"}) == ([make_id(2)], False)
    assert page_ids(store, metadata={"topic": "refunds"}) == ([record.id], False)
    assert store.set_metadata("acme", make_id(9), {"a": "b"}) is None


def test_delete_removes_the_record_and_its_feedback(store):
    gone, kept = rec(1, metadata={"p": "q"}), rec(2, metadata={"p": "q"})
    add(store, gone, kept)
    for key in ("k1", "k2"):
        store.put_feedback(fb(gone.id, key))
    store.put_feedback(fb(kept.id))
    assert store.delete("acme", gone.id) is True
    assert store.get("acme", gone.id) is None
    assert store.feedback("acme", record_ids=[gone.id]) == []
    assert [f.id for f in store.feedback("acme")] == [kept.id]
    assert page_ids(store, metadata={"p": "q"}) == ([kept.id], False)
    assert page_ids(store, model="a") == ([kept.id], False)
    assert store.delete("acme", gone.id) is False


def test_feedback_replaces_per_answer_and_key_and_retracts(store):
    one, two = rec(1), rec(2)
    add(store, one, two)
    store.put_feedback(fb(one.id, "k1", 1.0, created=at(3)))
    store.put_feedback(fb(one.id, "k1", -1.0, created=at(4)))
    store.put_feedback(fb(one.id, "k2", 0.5, created=at(5)))
    store.put_feedback(fb(two.id, "k1", 1.0, created=at(6)))
    assert [(f.id, f.key_id, f.rating) for f in store.feedback("acme", record_ids=[one.id])] == \
        [(one.id, "k1", -1.0), (one.id, "k2", 0.5)]
    assert [(f.id, f.key_id) for f in store.feedback("acme", since=at(5))] == [(one.id, "k2"), (two.id, "k1")]
    assert [f.key_id for f in store.feedback("acme", record_ids=[one.id], since=at(5))] == ["k2"]
    assert store.feedback("acme", record_ids=[]) == []
    assert store.feedback("acme", record_ids=[one.id])[0] == fb(one.id, "k1", -1.0, created=at(4))
    assert store.delete_feedback("acme", one.id, "k1") == 1
    assert store.delete_feedback("acme", one.id, "k1") == 0
    store.put_feedback(fb(one.id, "k3"))
    assert store.delete_feedback("acme", one.id, None) == 2
    assert [f.id for f in store.feedback("acme")] == [two.id]


def test_erase_by_user_and_by_metadata_pair(store):
    records = [rec(0, user="ann"), rec(1, user="bob", metadata={"case": "7"}), rec(2, user="ann"),
               rec(3, route="completions", user="ann"), rec(4, metadata={"case": "7"}), rec(5, metadata={"case": "8"})]
    add(store, *records)
    r = ids(records)
    store.put_feedback(fb(r[0]))
    store.put_feedback(fb(r[5]))
    assert store.erase("acme", user="ann") == [r[0], r[2], r[3]]
    assert [store.get("acme", i) for i in (r[0], r[2], r[3])] == [None, None, None]
    assert [f.id for f in store.feedback("acme")] == [r[5]]
    assert store.erase("acme", metadata=("case", "7")) == [r[1], r[4]]
    assert page_ids(store) == ([r[5]], False)
    assert store.erase("acme", user="ann") == []
    assert store.erase("acme", user="bob", metadata=("case", "8")) == []
    assert store.erased("acme", [*r, make_id(99)]) == 5
    assert store.erased("acme", [r[0], r[0]]) == 1
    assert store.erased("other", r) == 0
    with pytest.raises(ValueError):
        store.erase("acme")


def test_expire_deletes_old_records_and_their_feedback(store):
    records = [rec(n, route="completions" if n == 1 else "chat.completions", metadata={"p": "q"}) for n in range(5)]
    add(store, *records, rec(0, tenant="other"))
    r = ids(records)
    store.put_feedback(fb(r[1]))
    store.put_feedback(fb(r[3]))
    assert store.expire("acme", at(3)) == 3
    assert page_ids(store) == ([r[3], r[4]], False)
    assert page_ids(store, route="completions") == ([], False)
    assert page_ids(store, metadata={"p": "q"}) == ([r[3], r[4]], False)
    assert [f.id for f in store.feedback("acme")] == [r[3]]
    assert store.ledger("acme", r[0]) is not None  # the ledger expires on its own
    assert store.expire("acme", at(3)) == 0
    assert store.get("other", make_id(0)) is not None


def test_expire_ledger_and_feedback_on_unrecorded_answers(store):
    recorded = rec(1)
    unrecorded = LedgerEntry(make_id(2, "completions"), "acme", "k1", "a@1", at(2))
    fresh = LedgerEntry(make_id(5), "other", None, None, at(5))
    store.add([recorded], [recorded.ledger, unrecorded, fresh])
    store.put_feedback(fb(recorded.id))
    store.put_feedback(fb(unrecorded.id))
    store.put_feedback(fb(fresh.id, tenant="other"))
    assert store.expire_ledger(at(3)) == 2
    assert store.ledger("acme", recorded.id) is None
    assert store.ledger("acme", unrecorded.id) is None
    assert store.ledger("other", fresh.id) == fresh
    assert [f.id for f in store.feedback("acme")] == [recorded.id]
    assert [f.id for f in store.feedback("other")] == [fresh.id]
    assert store.get("acme", recorded.id) == recorded
    assert store.expire_ledger(at(3)) == 0


def test_scan_oldest_first_by_version_since_and_route(store):
    records = [rec(0, version="a@1"), rec(1, route="completions", version="a@2"), rec(2, version="ab@1"),
               rec(3, version=None), rec(4, route="completions", version="a@1")]
    add(store, *reversed(records), rec(5, tenant="other"))
    r = ids(records)
    assert ids(store.scan("acme")) == r
    assert ids(store.scan("acme", version_prefix="a@")) == [r[0], r[1], r[4]]
    assert ids(store.scan("acme", since=at(2))) == [r[2], r[3], r[4]]
    assert ids(store.scan("acme", route="completions")) == [r[1], r[4]]
    assert ids(store.scan("acme", version_prefix="a@", since=at(1), route="chat.completions")) == []
    assert list(store.scan("nobody")) == []


def test_tenants(store):
    assert store.tenants() == []
    add(store, rec(1, tenant="zeta"))
    store.add([], [LedgerEntry(make_id(2), "alpha", None, None, at(2))])
    store.save_snapshot(Snapshot("s1", "beta", None, (), {}, at(3)))
    assert store.tenants() == ["alpha", "zeta"]


def test_snapshots(store):
    snapshot = Snapshot("snap-1", "acme", "a", (make_id(1), make_id(2)), {"since": "7d", "rating": 1}, at(3))
    store.save_snapshot(snapshot)
    assert store.snapshot("acme", "snap-1") == snapshot
    assert store.snapshot("other", "snap-1") is None
    assert store.snapshot("acme", "snap-2") is None


def test_sqlite_file_is_private_and_serves_threads(tmp_path):
    store = SqliteStore(tmp_path / "completions.sqlite3")
    assert stat.S_IMODE(os.stat(tmp_path / "completions.sqlite3").st_mode) == 0o600
    errors = []

    def write(start: int) -> None:
        try:
            for n in range(start, start + 200, 20):
                add(store, *(rec(i) for i in range(n, n + 20)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(start,)) for start in (0, 200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(list(store.scan("acme"))) == 400
    for name in ("completions.sqlite3-wal", "completions.sqlite3-shm"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600


def test_s3_refuses_an_id_out_of_time_order(s3_url):
    store = S3Store(s3_url)
    with pytest.raises(ValueError):
        add(store, rec(1, id="chatcmpl-not-a-time"))
    with pytest.raises(ValueError):
        add(store, rec(1, id=make_id(1, "completions")))
    assert store.tenants() == []


def test_s3_lists_skip_markers_left_behind(s3_url):
    store = S3Store(s3_url)
    record = rec(1, metadata={"p": "q"})
    add(store, record)
    # as a write or delete cut short leaves them: a marker of no record, and one the record no longer matches
    store.store.put(f"acme/index/model/a/{make_id(0)}", b"")
    store.store.put(f"acme/index/model/b/{record.id}", b"")
    store.store.put(f"acme/index/meta/p/r/{record.id}", b"")
    assert page_ids(store, model="a") == ([record.id], False)
    assert page_ids(store, model="b") == ([], False)
    assert page_ids(store, metadata={"p": "r"}) == ([], False)
    assert store.erase("acme", metadata=("p", "r")) == []
    assert store.get("acme", record.id) == record
