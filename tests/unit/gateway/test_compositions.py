"""Compositions named per request: the real gateway app over a stand-in engine."""

import asyncio
from contextlib import asynccontextmanager

import pytest

from loadtest.stub_engine import StubEngine
from server.gateway import compositions
from server.registry.directory import DirectoryRegistry
from server.store.documents import FileDocument
from server.tenancy.keys import KEYS_FILE, KeyStore
from tests.helpers.in_process import gateway_over, ready
from tests.helpers.polling import wait_for

Q, UP = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"


@pytest.fixture
async def engine():
    stub = await StubEngine(tokens=2, serves_all=True).start()
    yield stub
    await stub.stop()


@pytest.fixture
def setup(tmp_path, base, adapter_factory) -> dict[str, str]:
    """Adapters a (rank 4) and b (rank 8) of acme, c of globex (public); keys of acme and globex."""
    registry = DirectoryRegistry(tmp_path / "registry")
    for name, tenant, rank, modules in (("a", "acme", 4, (Q,)), ("b", "acme", 8, (Q, UP)), ("c", "globex", 4, (Q,))):
        registry.register(name, adapter_factory(rank=rank, modules=modules), base=base, max_rank=16, tenant=tenant,
                          public=tenant == "globex")
    store = KeyStore(FileDocument(tmp_path / "state" / KEYS_FILE))
    return {"acme": store.create("acme")[1], "globex": store.create("globex")[1]}


@asynccontextmanager
async def serving(engine, base, tmp_path, **settings):
    async with gateway_over([engine.url], str(base.path), tmp_path, **settings) as client:
        assert await wait_for(lambda: ready(client), 30)
        yield client


async def ask(client, key: str, adapter) -> object:
    return await client.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                             json={"model": "base", "adapter": adapter, "prompt": "hi"})


async def test_a_recipe_is_composed_once_and_served_as_a_content_addressed_version(tmp_path, base, engine, setup):
    async with serving(engine, base, tmp_path) as client:
        first = await ask(client, setup["acme"], [{"name": "a@1", "weight": 0.7}, {"name": "b", "weight": 0.3}])
        assert first.status_code == 200, first.text
        served = first.json()["model"]
        assert served.startswith("composed.") and served.endswith("@1")
        again = await ask(client, setup["acme"], [{"name": "b@1", "weight": 0.301}, {"name": "a", "weight": 0.7}])
        assert again.json()["model"] == served, "the same recipe in another order, weights rounded: a cache hit"
        other = await ask(client, setup["acme"], [{"name": "a", "weight": 0.5}, {"name": "b", "weight": 0.5}])
        assert other.json()["model"] != served
    registry = DirectoryRegistry(tmp_path / "registry")
    name = served.split("@")[0]
    assert registry.versions(name) == [1]
    manifest = registry.get(name, 1).manifest
    assert manifest["tenant"] == "acme" and manifest["rank"] == 12
    assert [(r["name"], r["version"], r["weight"]) for r in manifest["recipe"]] == [("a", 1, 0.7), ("b", 1, 0.3)]
    assert manifest["recipe"][0]["sha256"] == registry.get("a", 1).manifest["files"]["adapter_model.safetensors"][
        "sha256"]


async def test_concurrent_first_requests_compose_once(tmp_path, base, engine, setup):
    async with serving(engine, base, tmp_path) as client:
        recipe = [{"name": "a", "weight": 1}, {"name": "b", "weight": -0.25}]
        answers = await asyncio.gather(*(ask(client, setup["acme"], recipe) for _ in range(8)))
    assert {r.status_code for r in answers} == {200}
    names = {r.json()["model"] for r in answers}
    assert len(names) == 1 and names.pop().endswith("@1")


async def test_another_tenants_adapter_answers_as_a_missing_one_even_public(tmp_path, base, engine, setup):
    async with serving(engine, base, tmp_path) as client:
        foreign = await ask(client, setup["acme"], [{"name": "a", "weight": 1}, {"name": "c", "weight": 1}])
        missing = await ask(client, setup["acme"], [{"name": "a", "weight": 1}, {"name": "zzz", "weight": 1}])
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["error"]["code"] == "adapter_not_found"
    assert foreign.json()["error"]["message"].replace("'c'", "'zzz'") == missing.json()["error"]["message"]
    assert foreign.json()["error"]["param"] == "adapter.1.name"


async def test_a_recent_composition_is_never_trimmed_however_many_are_made(tmp_path, base, engine, setup):
    async with serving(engine, base, tmp_path, max_composed_per_tenant=1) as client:
        for weight in (0.1, 0.2, 0.3):
            assert (await ask(client, setup["acme"], [{"name": "a", "weight": weight}])).status_code == 200
    names = [n for n in DirectoryRegistry(tmp_path / "registry").names() if n.startswith("composed.")]
    assert len(names) == 3, "within the grace period a request may still be on its way to the engine"


@pytest.mark.parametrize("adapter, status, param, words", [
    ([{"name": "a", "weight": 0.001}, {"name": "b", "weight": 1}], 400, "adapter.0.weight", "non-zero"),
    ([{"name": "a", "weight": 11}], 400, "adapter.0.weight", "less than or equal to 10"),
    ([{"name": "a", "weight": 1, "scale": 2}], 400, "adapter.0.scale", "Extra inputs"),
    ([], 400, "adapter", "at least 1"),
    ([{"name": "a", "weight": 1}] * 9, 400, "adapter", "at most 8"),
    ([{"name": "a", "weight": 1}, {"name": "a@1", "weight": 1}], 400, "adapter", "names a@1 twice"),
    ([{"name": "b", "weight": 1}, {"name": "b2", "weight": 1}], 400, "adapter", "exceeds MAX_LORA_RANK 16"),
    ([{"name": "a@!", "weight": 1}], 400, "adapter", "invalid adapter reference"),
])
async def test_bad_recipes_are_refused_naming_the_problem(tmp_path, base, adapter_factory, engine, setup, adapter,
                                                          status, param, words):
    DirectoryRegistry(tmp_path / "registry").register("b2", adapter_factory(rank=16), base=base, max_rank=16,
                                                      tenant="acme")
    async with serving(engine, base, tmp_path) as client:
        r = await ask(client, setup["acme"], adapter)
    error = r.json()["error"]
    assert (r.status_code, error["param"]) == (status, param), r.text
    assert words in error["message"]
    assert not [n for n in DirectoryRegistry(tmp_path / "registry").names() if n.startswith("composed.")]


async def test_past_the_cap_the_least_recently_used_composition_is_deleted(tmp_path, base, engine, setup,
                                                                            monkeypatch):
    monkeypatch.setattr(compositions, "GRACE_SECONDS", -1.0)
    async with serving(engine, base, tmp_path, max_composed_per_tenant=2) as client:
        served = []
        for weight in (0.1, 0.2):
            r = await ask(client, setup["acme"], [{"name": "a", "weight": weight}, {"name": "b", "weight": 1}])
            served.append(r.json()["model"].split("@")[0])
        await ask(client, setup["acme"], [{"name": "a", "weight": 0.1}, {"name": "b", "weight": 1}])  # used again
        r = await ask(client, setup["acme"], [{"name": "a", "weight": 0.3}, {"name": "b", "weight": 1}])
        served.append(r.json()["model"].split("@")[0])
    names = {n for n in DirectoryRegistry(tmp_path / "registry").names() if n.startswith("composed.")}
    assert names == {served[0], served[2]}, "the one used least recently went"


async def test_the_admin_compose_route_registers_a_recipe_of_the_tenants_own_adapters(tmp_path, base, engine, setup):
    store = KeyStore(FileDocument(tmp_path / "state" / KEYS_FILE))
    acme, operator = store.create("acme", "tenant-admin")[1], store.create(None, "admin", "ops")[1]

    async def compose(key: str, name: str, sources: list, **extra):
        return await client.post(f"/admin/adapters/{name}/compose", json={"sources": sources, **extra},
                                 headers={"Authorization": f"Bearer {key}"})

    async with serving(engine, base, tmp_path) as client:
        made = await compose(acme, "mix", [{"name": "a@1", "weight": 0.5}, {"name": "b", "weight": 0.5}])
        assert made.status_code == 201, made.text
        assert (made.json()["tenant"], made.json()["rank"], made.json()["version"]) == ("acme", 12, 1)
        served = await ask(client, setup["acme"], "mix")
        assert served.json()["model"] == "mix@1"
        foreign = await compose(acme, "mix", [{"name": "a", "weight": 1}, {"name": "c", "weight": 1}])
        missing = await compose(acme, "mix", [{"name": "a", "weight": 1}, {"name": "zzz", "weight": 1}])
        assert foreign.status_code == missing.status_code == 404
        assert foreign.json()["error"]["message"].replace("'c'", "'zzz'") == missing.json()["error"]["message"]
        reserved = await compose(acme, "composed.x", [{"name": "a", "weight": 1}])
        assert reserved.status_code == 400 and "reserved" in reserved.json()["error"]["message"]
        needs_tenant = await compose(operator, "mix2", [{"name": "a", "weight": 1}, {"name": "c", "weight": 1}])
        assert needs_tenant.status_code == 400 and needs_tenant.json()["error"]["param"] == "tenant"
        mixed = await compose(operator, "mix2", [{"name": "a", "weight": 1}, {"name": "c", "weight": 1}],
                              tenant="acme")
        assert mixed.status_code == 404 and mixed.json()["error"]["param"] == "sources.1.name", "never two tenants'"
        ops = await compose(operator, "mix2", [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}],
                            tenant="acme")
        assert ops.status_code == 201 and [r["name"] for r in ops.json()["recipe"]] == ["a", "b"]
        by_operator = await ask(client, operator, [{"name": "a", "weight": 1}])
        assert by_operator.status_code == 400 and "operator key has no tenant" in by_operator.json()["error"]["message"]
    assert DirectoryRegistry(tmp_path / "registry").versions("mix") == [1]
