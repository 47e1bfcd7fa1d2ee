"""The engine-side resolver's bookkeeping, over stand-ins for vLLM's serving models (the real engine runs it in
tests/e2e: test_serving's residency bound, test_cluster's fetches and refetch)."""

import time
from pathlib import Path
from types import SimpleNamespace

from server.config import Settings
from server.resolver import GRACE, Lookups, RegistryResolver


def resolver(tmp_path: Path, held: dict[str, str], running: set[str], limit: int = 2) -> RegistryResolver:
    r = RegistryResolver(Settings(registry=str(tmp_path / "reg"), adapter_cache=tmp_path / "cache",
                                  max_resident_adapters=limit))
    states = {f"req-{n}": SimpleNamespace(lora_name=n) for n in running}
    r.models = SimpleNamespace(lora_requests=Lookups({n: SimpleNamespace(lora_path=p) for n, p in held.items()}),
                               engine_client=SimpleNamespace(output_processor=SimpleNamespace(request_states=states)))
    return r


def test_past_the_bound_the_least_recently_looked_up_idle_versions_are_dropped(tmp_path):
    r = resolver(tmp_path, {f"a@{i}": f"/cache/{i}" for i in range(5)}, running={"a@0"}, limit=3)
    table = r.models.lora_requests
    long_ago = time.monotonic() - 10 * GRACE
    table.used.update({"a@0": long_ago - 5, "a@1": long_ago - 4, "a@2": long_ago - 3, "a@3": long_ago})
    table["a@4"]  # a request looked it up just now and is on its way to the engine
    r._forget_idle()
    assert sorted(table) == ["a@0", "a@3", "a@4"]  # two over the bound of 3: the two looked up longest ago go
    r.max_resident = 1
    r._forget_idle()
    assert sorted(table) == ["a@0", "a@4"]  # the running and the just-used stay, even over the bound


def test_an_adapter_a_request_has_checked_for_stays_until_it_is_used(tmp_path):
    """vLLM checks `name in table`, awaits, then takes the entry: a trim in between must not drop it."""
    r = resolver(tmp_path, {f"a@{i}": f"/cache/{i}" for i in range(3)}, running=set(), limit=1)
    table = r.models.lora_requests
    long_ago = time.monotonic() - 10 * GRACE
    table.used.update({"a@0": long_ago, "a@1": long_ago, "a@2": long_ago - 5})  # a@2 the least recently used
    assert "a@2" in table and "a@9" not in table
    r._forget_idle()
    assert sorted(table) == ["a@2"] and "a@9" not in table.used


def test_files_of_a_version_the_engine_holds_are_in_use(tmp_path):
    r = resolver(tmp_path, {"a@1": str(tmp_path / "entry")}, running=set())
    assert r._in_use(tmp_path / "entry") and not r._in_use(tmp_path / "other")
    r.models = None
    assert r._in_use(tmp_path / "other")  # before vLLM's table exists nothing is known: keep everything


def test_files_handed_to_vllm_are_in_use_before_vllm_lists_them(tmp_path):
    """vLLM loads an adapter into its workers and only then lists it; a trim in between must not take its files."""
    import server.resolver as resolver_module

    r = resolver(tmp_path, {}, running=set())
    entry = tmp_path / "entry"
    r._handed[entry] = time.monotonic()
    assert r._in_use(entry)
    r.models.lora_requests["a@1"] = SimpleNamespace(lora_path=str(entry))  # listed: the list protects it now
    assert r._in_use(entry) and entry not in r._handed
    del r.models.lora_requests["a@1"]
    assert not r._in_use(entry)
    r._handed[entry] = time.monotonic() - resolver_module.HANDED_OUT  # handed out and never listed: a failed load
    assert not r._in_use(entry) and entry not in r._handed
