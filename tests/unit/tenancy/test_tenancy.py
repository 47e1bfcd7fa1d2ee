"""Scoped keys on /admin, named actors in the audit log, per-tenant usage and budgets: the real gateway app over a
stand-in engine."""

import json
import math

import pytest

from loadtest.stub_engine import USAGE, StubEngine
from server.store.documents import FileDocument
from server.tenancy.keys import KEYS_FILE, KeyStore
from tests.helpers.archives import archive
from tests.helpers.in_process import gateway_over, ready
from tests.helpers.polling import wait_for


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def engine():
    stub = await StubEngine(tokens=2).start()
    yield stub
    await stub.stop()


@pytest.fixture
def keys(tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (key id, key): tenant-admins of acme and globex, an acme inference key, the operator alice."""
    store = KeyStore(FileDocument(tmp_path / "state" / KEYS_FILE))
    return {"acme-admin": store.create("acme", "tenant-admin"), "globex-admin": store.create("globex", "tenant-admin"),
            "acme": store.create("acme"), "alice": store.create(None, "admin", "alice")}


async def upload(client, key: str, name: str, adapter_dir, **form) -> object:
    return await client.post("/admin/adapters", headers=bearer(key), data={"name": name, **form},
                             files={"file": (f"{name}.tar.gz", archive(adapter_dir))})


async def test_tenant_admins_manage_their_own_adapters_and_see_no_other(tmp_path, base, adapter_factory, engine, keys):
    acme, globex = keys["acme-admin"][1], keys["globex-admin"][1]
    async with gateway_over([engine.url], str(base.path), tmp_path) as client:
        assert (await upload(client, acme, "acme-bot", adapter_factory())).status_code == 201
        r = await upload(client, globex, "globex-bot", adapter_factory())
        assert r.status_code == 201 and r.json()["tenant"] == "globex"
        assert (await upload(client, acme, "acme-bot", adapter_factory())).json()["version"] == 2
        refused = await upload(client, acme, "sneaky", adapter_factory(), tenant="globex")
        assert refused.status_code == 403 and refused.json()["error"]["param"] == "tenant"

        calls = [("GET", "/admin/adapters/globex-bot", None), ("PUT", "/admin/adapters/globex-bot/aliases/stable",
                 {"version": 1}), ("PUT", "/admin/adapters/globex-bot/aliases/stable/canary",
                 {"version": 1, "weight": 10}), ("POST", "/admin/adapters/globex-bot/rollback", {}),
                 ("POST", "/admin/adapters/globex-bot/aliases/stable/promote", None),
                 ("DELETE", "/admin/adapters/globex-bot/versions/1", None), ("DELETE", "/admin/adapters/globex-bot",
                                                                             None)]

        async def answers() -> list[tuple[int, bytes]]:
            out = []
            for method, path, body in calls:
                r = await client.request(method, path, headers=bearer(acme), json=body)
                out.append((r.status_code, r.content))
            return out

        foreign = await answers()
        assert {status for status, _ in foreign} == {404}
        listed = (await client.get("/admin/adapters", headers=bearer(acme))).json()["data"]
        assert [a["name"] for a in listed] == ["acme-bot"]
        own = await client.put("/admin/adapters/globex-bot/aliases/stable", json={"version": 1}, headers=bearer(globex))
        assert own.status_code == 200
        assert (await client.delete("/admin/adapters/globex-bot", headers=bearer(globex))).status_code == 200
        assert await answers() == foreign, "another tenant's adapter answers byte for byte as a missing one"

        for version in (1, 2):
            moved = await client.put("/admin/adapters/acme-bot/aliases/stable", json={"version": version},
                                     headers=bearer(acme))
            assert moved.status_code == 200
        back = await client.post("/admin/adapters/acme-bot/rollback", headers=bearer(acme))
        assert back.status_code == 200 and back.json()["version"] == 1
        await client.put("/admin/adapters/acme-bot/aliases/stable", json={"version": 2}, headers=bearer(acme))
        assert (await client.delete("/admin/adapters/acme-bot/versions/1", headers=bearer(acme))).status_code == 200
        operator = await client.get("/admin/adapters", headers=bearer(keys["alice"][1]))
        assert [a["name"] for a in operator.json()["data"]] == ["acme-bot"]


async def test_inference_keys_are_refused_on_admin_and_revoked_operators_at_once(tmp_path, base, engine, keys):
    async with gateway_over([engine.url], str(base.path), tmp_path) as client:
        r = await client.get("/admin/adapters", headers=bearer(keys["acme"][1]))
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_role"
        alice = bearer(keys["alice"][1])
        assert (await client.get("/admin/adapters", headers=alice)).status_code == 200
        assert KeyStore(FileDocument(tmp_path / "state" / KEYS_FILE)).revoke("alice") == keys["alice"][0]
        assert (await client.get("/admin/adapters", headers=alice)).status_code == 401


async def test_the_audit_log_names_the_key_and_the_reason_never_the_secret(tmp_path, base, adapter_factory, engine,
                                                                           keys):
    acme_id, acme = keys["acme-admin"]
    async with gateway_over([engine.url], str(base.path), tmp_path) as client:
        assert (await upload(client, acme, "acme-bot", adapter_factory())).status_code == 201
        r = await client.delete("/admin/adapters/acme-bot", params={"reason": "replaced by acme-bot-2"},
                                headers=bearer(acme))
        assert r.status_code == 200
        await client.get("/admin/adapters", headers=bearer(keys["acme"][1]))  # refused: audited too
        entries = client.app.state.admin.audit.entries()
    text = (tmp_path / "state" / "audit.log").read_text()
    assert not any(key in text for _, key in keys.values())
    by_action = {e["action"]: e for e in entries}
    assert by_action["upload"]["actor"] == acme_id and by_action["upload"]["tenant"] == "acme"
    assert by_action["delete"]["reason"] == "replaced by acme-bot-2" and by_action["delete"]["versions"] == [1]
    refusal = by_action["GET /admin/adapters"]
    assert refusal["actor"] == keys["acme"][0] and refusal["result"].startswith("refused")


async def completions(client, key: str, n: int) -> list[int]:
    statuses = []
    for _ in range(n):
        r = await client.post("/v1/completions", headers=bearer(key), json={"prompt": "Ada", "max_tokens": 4})
        statuses.append(r.status_code)
    return statuses


async def test_usage_per_tenant_survives_a_restart(tmp_path, base, engine, keys):
    for restart in range(2):
        async with gateway_over([engine.url], str(base.path), tmp_path) as client:
            assert await wait_for(lambda: ready(client), 30)
            assert await completions(client, keys["acme"][1], 3) == [200] * 3
            assert await completions(client, keys["globex-admin"][1], 1) == [200]
            acme = (await client.get("/admin/usage", headers=bearer(keys["acme-admin"][1]))).json()
            assert acme["tenant"] == "acme" and acme["requests"] == 3 * (restart + 1)
            assert acme["prompt_tokens"] == USAGE["prompt_tokens"] * 3 * (restart + 1)
            assert acme["completion_tokens"] == USAGE["completion_tokens"] * 3 * (restart + 1)
            other = await client.get("/admin/usage", params={"tenant": "globex"}, headers=bearer(keys["acme-admin"][1]))
            assert other.status_code == 403
            globex = await client.get("/admin/usage", params={"tenant": "globex", "since": "1h"},
                                      headers=bearer(keys["alice"][1]))
            assert globex.json()["requests"] == restart + 1
            metrics = (await client.get("/metrics", headers=bearer("admin-token"))).text
            assert f'loraplex_tenant_completion_tokens_total{{tenant="acme"}} {3 * USAGE["completion_tokens"]}.0' \
                in metrics


async def test_a_budget_refuses_the_request_after_the_one_that_reached_it(tmp_path, base, engine, keys):
    per_request = USAGE["prompt_tokens"] + USAGE["completion_tokens"]
    budget = 5 * per_request - 1  # the fifth request is admitted below it and reaches it
    async with gateway_over([engine.url], str(base.path), tmp_path,
                            tenant_budgets={"acme": {"tokens_per_day": budget}}) as client:
        assert await wait_for(lambda: ready(client), 30)
        statuses = await completions(client, keys["acme"][1], 8)
        assert statuses == [200] * math.ceil(budget / per_request) + [429] * 3
        r = await client.post("/v1/completions", headers=bearer(keys["acme"][1]), json={"prompt": "A", "max_tokens": 4})
        assert r.json()["error"]["code"] == "token_budget_exceeded" and int(r.headers["retry-after"]) >= 1
        assert await completions(client, keys["globex-admin"][1], 2) == [200, 200]  # other tenants are not held
        assert json.loads((await client.get("/admin/usage", headers=bearer(keys["acme-admin"][1]))).content)[
            "requests"] == 5
