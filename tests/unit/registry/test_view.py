"""The gateway's in-memory registry view: one parse and no store read per request for a version already seen, one
read of the adapter for anything else, and a deleted version reported on the next reading."""

import asyncio
import threading

import pytest

from server.registry import NotFound
from server.registry import view as view_module
from server.registry.s3 import S3Registry
from server.registry.view import RegistryView
from tests.helpers.spies import count_calls


def register(reg, base, src, name="acme", **kw):
    return reg.register(name, src, base=base, max_rank=64, **kw)


@pytest.fixture
def aliased(reg, base, adapter_factory):
    """acme@1 and @2, `stable` on 1 with a canary of 50% on 2 and a shadow of 10% on 2; hidden@1 of another tenant."""
    for seed in (1, 2):
        register(reg, base, adapter_factory(seed=seed), tenant="acme")
    register(reg, base, adapter_factory(seed=3), name="hidden", tenant="other")
    reg.set_alias("acme", "stable", 1)
    reg.set_canary("acme", "stable", 2, 50)
    reg.set_shadow("acme", "stable", 2, 10)
    if isinstance(reg, S3Registry):
        reg.max_age = 3600  # as the gateway opens it: no refresh of its own in the middle of a count
    deleted = []
    view = RegistryView(reg, poll=3600, on_deleted=deleted.extend)
    view.refresh()
    return view, deleted


async def test_an_aliased_request_parses_once_and_reads_nothing_from_the_store(aliased, monkeypatch):
    view, _ = aliased
    parses = count_calls(monkeypatch, view_module, "parse_ref")
    reads = count_calls(monkeypatch, view.registry, *REGISTRY_READS)
    sides = set()
    for user in range(40):
        target = await view.resolve("acme@stable", f"key:{user}", "acme")
        sides.add(target.version.version)
        # The shadow comes with the answer, for the side that is not the shadow's own version.
        assert target.shadow == (None if target.version.version == 2 else (10, view.entries["acme"].versions[2]))
    assert sides == {1, 2}  # the canary splits callers
    assert parses.count == 40 and reads.count == 0


async def test_the_same_caller_stays_on_one_side_of_a_canary(aliased):
    view, _ = aliased
    assert len({(await view.resolve("acme@stable", "key:7", None)).version.version for _ in range(20)}) == 1


async def test_a_version_not_seen_yet_is_read_once_and_then_served_from_memory(aliased, base, adapter_factory,
                                                                                monkeypatch):
    view, _ = aliased
    register(view.registry, base, adapter_factory(seed=4), tenant="acme")
    reads = count_calls(monkeypatch, view.registry, "state", "entry")
    assert (await view.resolve("acme@3", None, "acme")).version.version == 3
    assert reads.calls == ["state", "entry"]
    assert (await view.resolve("acme@3", None, "acme")).version.version == 3
    assert reads.calls == ["state", "entry"]


async def test_another_tenants_adapter_is_refused_after_the_same_reads_as_a_missing_one(aliased, monkeypatch):
    view, _ = aliased
    reads = count_calls(monkeypatch, view.registry, "entry", *REGISTRY_READS)
    work = []
    for ref in ("hidden", "missing"):
        reads.calls.clear()
        with pytest.raises(NotFound, match=f"adapter {ref} not found"):
            await view.resolve(ref, None, "acme")
        work.append(list(reads.calls))
    assert work[0] == work[1] and work[0][0] == "state" and "entry" not in work[0]  # its state, and no more
    assert (await view.resolve("hidden", None, None)).version.key == "hidden@1"  # an operator sees it


async def test_a_version_deleted_elsewhere_is_reported_and_refused_after_the_next_reading(aliased):
    view, deleted = aliased
    view.registry.delete_version("acme", 1)
    assert (await view.resolve("acme@1", None, None)).version.version == 1  # until the view is renewed
    assert view.refresh() == ["acme@1"]
    with pytest.raises(NotFound):
        await view.resolve("acme@1", None, None)


async def test_a_write_through_this_gateway_is_served_at_once(aliased):
    view, deleted = aliased
    view.registry.set_alias("acme", "stable", 2)
    await view.areload("acme")
    assert (await view.resolve("acme@stable", "key:1", None)).version.version == 2
    view.registry.delete("acme")
    await view.areload("acme")
    assert sorted(deleted) == ["acme@1", "acme@2"]
    with pytest.raises(NotFound):
        await view.resolve("acme", None, None)


# Every way a backend reads its store or its snapshot.
REGISTRY_READS = ("versions", "get", "names", "state", "tenant", "aliases", "alias_table", "shadows", "resolve",
                  "read_all", "refresh", "_state", "_alias_state", "_read_state", "_stored_versions")


async def test_a_reading_begun_before_the_one_in_place_does_not_replace_it(aliased, monkeypatch):
    """A lookup's reading that began before a deletion, landing after the background reading that saw the deletion,
    must not bring the deleted version back."""
    view, deleted = aliased
    real_entry, begun, release = view.registry.entry, threading.Event(), threading.Event()

    def slow_entry(name: str):
        found = real_entry(name)
        if not begun.is_set():  # only the first reading is held back
            begun.set()
            release.wait(10)
        return found

    monkeypatch.setattr(view.registry, "entry", slow_entry)
    late = asyncio.ensure_future(asyncio.to_thread(view.reload, "acme"))
    await asyncio.to_thread(begun.wait, 10)
    view.registry.delete_version("acme", 1)
    assert await asyncio.to_thread(view.refresh) == ["acme@1"]
    release.set()
    assert await late == []
    assert 1 not in view.entries["acme"].versions


def test_a_directory_reads_again_only_the_adapters_that_changed(tmp_path, base, adapter_factory, monkeypatch):
    from server.registry import directory

    reg = directory.DirectoryRegistry(tmp_path / "reg")
    for name in ("a", "b"):
        register(reg, base, adapter_factory(), name=name)
    monkeypatch.setattr(directory, "SETTLED_NS", 0)  # every folder counts as settled at once
    reads = count_calls(monkeypatch, reg, "entry")
    assert sorted(reg.read_all()) == ["a", "b"] and sorted(reads.calls) == ["entry", "entry"]
    reads.calls.clear()
    assert sorted(reg.read_all()) == ["a", "b"] and reads.calls == []
    reg.delete_version("b", 1)
    assert sorted(reg.read_all()) == ["a"] and reads.calls == ["entry"]


def test_an_unchanged_directory_is_not_listed_again(tmp_path, base, adapter_factory, monkeypatch):
    """Every write through the registry, from any process, moves its change mark; while the mark stays put (and
    settled), a reading of the whole registry opens no adapter's folder."""
    from server.registry import directory

    reg = directory.DirectoryRegistry(tmp_path / "reg")
    register(reg, base, adapter_factory(), name="a")
    monkeypatch.setattr(directory, "SETTLED_NS", 0)
    scans = count_calls(monkeypatch, directory.os, "scandir")
    assert sorted(reg.read_all()) == ["a"] and scans.calls
    scans.calls.clear()
    assert sorted(reg.read_all()) == ["a"] and scans.calls == []
    other = directory.DirectoryRegistry(tmp_path / "reg")  # another process's writes
    register(other, base, adapter_factory(), name="b")
    assert sorted(reg.read_all()) == ["a", "b"] and scans.calls
    other.set_alias("b", "stable", 1)
    assert reg.read_all()["b"].state["aliases"] == {"stable": 1}
    other.delete_version("a", 1)
    assert sorted(reg.read_all()) == ["b"]


def test_a_directory_without_a_change_mark_is_listed_every_time(tmp_path, base, adapter_factory, monkeypatch):
    """A registry last written by an older loraplex has no mark: every reading looks at every folder, as before."""
    from server.registry import directory

    reg = directory.DirectoryRegistry(tmp_path / "reg")
    register(reg, base, adapter_factory(), name="a")
    (tmp_path / "reg" / directory.CHANGES_FILE).unlink()
    monkeypatch.setattr(directory, "SETTLED_NS", 0)
    scans = count_calls(monkeypatch, directory.os, "scandir")
    reg.read_all()
    reg.read_all()
    assert scans.calls.count("scandir") >= 2
