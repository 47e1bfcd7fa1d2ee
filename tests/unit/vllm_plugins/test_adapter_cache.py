import os
from pathlib import Path

import pytest

from server.registry.directory import DirectoryRegistry
from server.vllm_plugins.adapter_cache import AdapterCache, CorruptAdapter


def register(reg, base, src, name="acme"):
    return reg.register(name, src, base=base, max_rank=64)


class Flaky:
    """A registry whose next `broken` fetches write damaged weights (a bad disk, a proxy mangling the bytes)."""

    def __init__(self, registry: DirectoryRegistry, broken: int = 0, die_after: int | None = None):
        self.registry, self.broken, self.die_after, self.fetches = registry, broken, die_after, 0

    def fetch(self, version, dest: Path) -> None:
        self.fetches += 1
        self.registry.fetch(version, dest)
        if self.die_after is not None:
            raise KeyboardInterrupt("killed halfway")  # the download dies with its files on disk
        if self.broken:
            self.broken -= 1
            weights = dest / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:-1] + b"\0")


def test_an_entry_is_fetched_once_and_shared_by_versions_with_the_same_files(tmp_path, base, adapter_factory):
    reg = DirectoryRegistry(tmp_path / "reg")
    src = adapter_factory()
    v1, v2 = register(reg, base, src), register(reg, base, src)
    cache, source = AdapterCache(tmp_path / "cache", 1 << 30, 8), Flaky(reg)
    entry = cache.entry(v1)
    assert cache.ensure(v1, source) and not cache.ensure(v1, source) and not cache.ensure(v2, source)
    assert cache.entry(v2) == entry and source.fetches == 1
    assert (entry / "adapter_model.safetensors").read_bytes() == \
        (v1.path / "adapter_model.safetensors").read_bytes()


def test_a_damaged_download_is_never_handed_out(tmp_path, base, adapter_factory):
    reg = DirectoryRegistry(tmp_path / "reg")
    v = register(reg, base, adapter_factory())
    cache = AdapterCache(tmp_path / "cache", 1 << 30, 8)
    with pytest.raises(CorruptAdapter):
        cache.ensure(v, Flaky(reg, broken=1))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []
    assert cache.ensure(v, Flaky(reg)) and cache.entry(v).is_dir()


def test_a_cached_file_damaged_on_disk_is_detected_and_fetched_again(tmp_path, base, adapter_factory):
    reg = DirectoryRegistry(tmp_path / "reg")
    v = register(reg, base, adapter_factory())
    cache, source = AdapterCache(tmp_path / "cache", 1 << 30, 8), Flaky(reg)
    cache.ensure(v, source)
    weights = cache.entry(v) / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:100])
    assert cache.ensure(v, source) and weights.read_bytes() == good and source.fetches == 2


def test_a_download_killed_halfway_is_not_served_and_is_cleared_at_the_next_start(tmp_path, base, adapter_factory):
    reg = DirectoryRegistry(tmp_path / "reg")
    v = register(reg, base, adapter_factory())
    cache = AdapterCache(tmp_path / "cache", 1 << 30, 8)
    partial = tmp_path / "cache" / ".partial-left-by-a-crash"
    partial.mkdir()  # what a SIGKILL in the middle of a download leaves
    with pytest.raises(KeyboardInterrupt):
        cache.ensure(v, Flaky(reg, die_after=0))
    source = Flaky(reg)
    assert cache.ensure(v, source) and cache.entry(v).is_dir() and source.fetches == 1
    AdapterCache(tmp_path / "cache", 1 << 30, 8)
    assert not partial.exists()


def test_past_its_bounds_the_least_recently_used_entries_outside_those_kept_are_named(tmp_path, base,
                                                                                       adapter_factory):
    """The cache deletes nothing by itself: its owner (the engine's residency) removes what it names, when nothing
    references it."""
    reg = DirectoryRegistry(tmp_path / "reg")
    versions = [register(reg, base, adapter_factory(seed=i), name=f"a{i}") for i in range(4)]
    cache, source = AdapterCache(tmp_path / "cache", 1 << 30, 2), Flaky(reg)
    entries = []
    for i, v in enumerate(versions):
        cache.ensure(v, source)
        entries.append(cache.entry(v))
        os.utime(entries[-1], ns=(i * 10**9, i * 10**9))  # distinct use times, oldest first
    stored = cache.stored()
    assert [s.entry for s in stored] == entries
    assert cache.excess(stored, keep={entries[0]}) == [entries[1], entries[2]]
    size = sum(f.stat().st_size for f in entries[3].iterdir())
    small = AdapterCache(tmp_path / "cache", size, 8)
    assert small.excess(stored, keep=set()) == entries[:3]
    small.remove(entries[0])
    assert len(small.stored()) == 3 and not entries[0].exists()
