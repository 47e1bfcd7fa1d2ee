import json

import pytest

from server.registry import Conflict, InvalidReference, NotFound, Ref, Registry, parse_ref
from server.validation import InvalidAdapter


@pytest.mark.parametrize("text,ref", [
    ("acme", Ref("acme")),
    ("acme@3", Ref("acme", version=3)),
    ("acme@stable", Ref("acme", alias="stable")),
    ("acme-support.v2_x@latest", Ref("acme-support.v2_x", alias="latest")),
])
def test_parse_ref(text, ref):
    assert parse_ref(text) == ref
    assert str(parse_ref(text)) == text


@pytest.mark.parametrize("text", ["", "Acme", "-acme", "acme@", "acme@0", "acme@03", "acme@-1", "acme@1@2",
                                  "../etc", "a/b", "acme@Stable", "x" * 65, "acme@3x",
                                  # hardening review: non-ASCII digits, trailing newlines, versions past 2**31
                                  "x@\u00b2", "x@\u0661", "x@\uff11", "acme\n", "acme@stable\n", "acme@1\n",
                                  "acme@" + "9" * 300, "acme@2147483648"])
def test_parse_ref_rejects(text):
    with pytest.raises(InvalidReference):
        parse_ref(text)


def register(reg, base, src, name="acme", **kw):
    return reg.register(name, src, base=base, max_rank=64, **kw)


def test_versions_latest_and_aliases(tmp_path, base, adapter_factory):
    reg = Registry(tmp_path / "reg")
    v1 = register(reg, base, adapter_factory(seed=1), tenant="t1")
    v2 = register(reg, base, adapter_factory(seed=2, rank=8), tenant="t1")
    assert (v1.version, v2.version) == (1, 2)
    assert reg.resolve("acme").version == 2
    assert reg.resolve("acme@latest").version == 2
    assert reg.resolve("acme@1").key == "acme@1"
    assert reg.resolve("acme@1").manifest["tenant"] == "t1"
    reg.set_alias("acme", "stable", 1)
    assert reg.resolve("acme@stable").version == 1
    assert reg.aliases("acme") == {"stable": 1, "latest": 2}
    assert reg.names() == ["acme"]
    m = v2.manifest
    assert m["rank"] == 8 and m["target_modules"] == ["q_proj"] and m["base_fingerprint"] == base.fingerprint
    for fname, meta in m["files"].items():
        assert (v2.path / fname).stat().st_size == meta["size"] and len(meta["sha256"]) == 64


def test_not_found(tmp_path, base, adapter_factory):
    reg = Registry(tmp_path / "reg")
    with pytest.raises(NotFound):
        reg.resolve("ghost")
    register(reg, base, adapter_factory())
    with pytest.raises(NotFound):
        reg.resolve("acme@2")
    with pytest.raises(NotFound):
        reg.resolve("acme@stable")
    with pytest.raises(NotFound):
        reg.set_alias("acme", "stable", 7)


def test_versions_are_never_reused(tmp_path, base, adapter_factory):
    import shutil

    reg = Registry(tmp_path / "reg")
    register(reg, base, adapter_factory())
    v2 = register(reg, base, adapter_factory(seed=3))
    shutil.rmtree(v2.path)
    assert register(reg, base, adapter_factory(seed=4)).version == 3


def test_failed_registration_leaves_nothing(tmp_path, base, adapter_factory):
    reg = Registry(tmp_path / "reg")
    register(reg, base, adapter_factory())
    before = sorted(p.relative_to(reg.root) for p in reg.root.rglob("*"))
    with pytest.raises(InvalidAdapter):
        register(reg, base, adapter_factory(rank=128))
    with pytest.raises(InvalidReference):
        register(reg, base, adapter_factory(), name="../evil")
    assert sorted(p.relative_to(reg.root) for p in reg.root.rglob("*")) == before
    assert reg.versions("acme") == [1]


def test_registered_copy_is_independent_of_source(tmp_path, base, adapter_factory):
    reg = Registry(tmp_path / "reg")
    src = adapter_factory()
    v = register(reg, base, src)
    (src / "adapter_config.json").write_text("{}")
    assert json.loads((v.path / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_invalid_alias(tmp_path, base, adapter_factory):
    reg = Registry(tmp_path / "reg")
    register(reg, base, adapter_factory())
    for alias in ("latest", "3", "Stable", "../x"):
        with pytest.raises(InvalidReference):
            reg.set_alias("acme", alias, 1)


def test_name_belongs_to_its_tenant(tmp_path, base, adapter_factory):
    reg = Registry(tmp_path / "reg")
    register(reg, base, adapter_factory(), tenant="acme")
    with pytest.raises(Conflict):
        register(reg, base, adapter_factory(), tenant="globex")
    assert reg.versions("acme") == [1] and reg.tenant("acme") == "acme"
    reg.delete("acme")
    assert register(reg, base, adapter_factory(), tenant="globex").version == 2  # numbers are never reused


def test_rollback_returns_to_previous_version(tmp_path, base, adapter_factory):
    reg = Registry(tmp_path / "reg")
    for seed in range(3):
        register(reg, base, adapter_factory(seed=seed))
    with pytest.raises(NotFound):
        reg.rollback("acme")
    reg.set_alias("acme", "stable", 1)
    reg.set_alias("acme", "stable", 2)
    reg.set_alias("acme", "stable", 3)
    assert reg.rollback("acme") == 2 and reg.resolve("acme@stable").version == 2
    reg.delete_version("acme", 1)
    with pytest.raises(NotFound):
        reg.rollback("acme")  # the only earlier version is gone
    assert reg.resolve("acme@stable").version == 2


def test_delete_version_hides_it_at_once(tmp_path, base, adapter_factory):
    reg = Registry(tmp_path / "reg")
    register(reg, base, adapter_factory(seed=1))
    register(reg, base, adapter_factory(seed=2))
    reg.set_alias("acme", "stable", 2)
    trash = reg.delete_version("acme", 2)
    assert trash.exists() and reg.versions("acme") == [1]
    assert reg.resolve("acme").version == 1
    with pytest.raises(NotFound):
        reg.resolve("acme@stable")
    problems, notes = reg.check()
    assert problems == [] and any(".trash-2-" in n for n in notes)


def test_check_finds_tampering(tmp_path, base, adapter_factory):
    reg = Registry(tmp_path / "reg")
    v = register(reg, base, adapter_factory())
    assert reg.check() == ([], [])
    with open(v.path / "adapter_model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)[0]
        f.seek(-1, 2)
        f.write(bytes([last ^ 0xFF]))
    (v.path / "adapter_config.json").unlink()
    problems, _ = reg.check()
    assert any("adapter_model.safetensors does not match" in p for p in problems)
    assert any("adapter_config.json is missing" in p for p in problems)


def test_a_version_beyond_any_possible_is_not_found(tmp_path, base, adapter_factory):
    reg = Registry(tmp_path / "reg")
    register(reg, base, adapter_factory(), tenant="t1")
    for version in (10**300, 0, -1):
        with pytest.raises(NotFound):
            reg.get("acme", version)
        with pytest.raises(NotFound):
            reg.set_alias("acme", "stable", version)
        with pytest.raises(NotFound):
            reg.delete_version("acme", version)


def test_whole_delete_and_register_of_one_name_are_serialized(tmp_path, base, adapter_factory, monkeypatch):
    """A registration started while a whole-adapter delete is under way must not survive it without an owner
    (another tenant could then take the name). The window is widened by starting the registration as soon as the
    delete lets go of the adapter's lock with a version trashed, and giving it time to finish if nothing holds it."""
    import threading

    import server.registry as registry_module

    reg = Registry(tmp_path / "reg")
    register(reg, base, adapter_factory(seed=1), tenant="t1")
    source = adapter_factory(seed=2)
    real_lock = registry_module.FileLock
    racer: list[threading.Thread] = []

    class RacingLock(real_lock):
        def release(self, force: bool = False) -> None:
            super().release(force)
            if not racer and not self.is_locked and list((reg.root / "acme").glob(".trash-*")):
                racer.append(threading.Thread(target=register, args=(reg, base, source), kwargs={"tenant": "t1"}))
                racer[0].start()
                racer[0].join(timeout=2)  # on the old code the registration completes here, inside the delete

    monkeypatch.setattr(registry_module, "FileLock", RacingLock)
    reg.delete("acme")
    monkeypatch.setattr(registry_module, "FileLock", real_lock)
    racer[0].join()
    assert reg.versions("acme"), "the registration after the delete must stand"
    assert reg.tenant("acme") == "t1", "a version that exists must have an owner"
    with pytest.raises(Conflict):
        register(reg, base, adapter_factory(seed=3), tenant="t2")
