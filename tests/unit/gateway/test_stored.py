"""Stored completions, feedback, erasure and retention through the real gateway app over a stand-in engine, read
with the official `openai` client."""

import asyncio
import json
import sqlite3
from contextlib import asynccontextmanager

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from loadtest.stub_engine import StubEngine
from server.store.documents import FileDocument
from server.tenancy.keys import KEYS_FILE, KeyStore
from tests.helpers.in_process import gateway_over, ready
from tests.helpers.polling import wait_for

EMAIL = "ana.lopez@example.com"


@pytest.fixture
async def engine():
    stub = await StubEngine(tokens=3).start()
    yield stub
    await stub.stop()


@pytest.fixture
def keys(tmp_path) -> dict[str, str]:
    store = KeyStore(FileDocument(tmp_path / "state" / KEYS_FILE))
    return {"k1": store.create("acme")[1], "k2": store.create("acme")[1],
            "admin": store.create("acme", "tenant-admin")[1], "globex": store.create("globex")[1],
            "globex-admin": store.create("globex", "tenant-admin")[1]}


@asynccontextmanager
async def gateway(engine, base, tmp_path, **settings):
    async with gateway_over([engine.url], str(base.path), tmp_path, **settings) as client:
        assert await wait_for(lambda: ready(client), 30)
        yield client


def oai(client: httpx.AsyncClient, key: str) -> AsyncOpenAI:
    transport = httpx.ASGITransport(app=client.app)
    return AsyncOpenAI(base_url="http://gateway/v1", api_key=key,
                       http_client=httpx.AsyncClient(transport=transport, base_url="http://gateway"))


async def set_policy(client, key: str, tenant: str, **policy) -> None:
    r = await client.put(f"/admin/tenants/{tenant}/data-policy", json=policy,
                         headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text


async def chat(api: AsyncOpenAI, text: str = "hi", **extra) -> str:
    """One chat request; the answer's id (a stream's, read from its events)."""
    if extra.get("stream"):
        stream = await api.chat.completions.create(model="base", messages=[{"role": "user", "content": text}],
                                                   **extra)
        ids = {chunk.id async for chunk in stream}
        assert len(ids) == 1
        return ids.pop()
    answer = await api.chat.completions.create(model="base", messages=[{"role": "user", "content": text}], **extra)
    return answer.id


async def listed(api: AsyncOpenAI, **filters) -> list:
    return [c async for c in api.chat.completions.list(**filters)]


async def until_listed(api: AsyncOpenAI, count: int, **filters) -> list:
    found = []

    async def enough() -> bool:
        found[:] = await listed(api, **filters)
        return len(found) >= count

    assert await wait_for(enough, 5), found
    return found


async def test_opt_in_stores_only_store_true_and_the_official_client_reads_them(tmp_path, base, engine, keys):
    async with gateway(engine, base, tmp_path) as client:
        await set_policy(client, keys["admin"], "acme", capture="opt-in", retention="30d", redact=["email"])
        k1, k2, admin = oai(client, keys["k1"]), oai(client, keys["k2"]), oai(client, keys["admin"])
        billing = await chat(k1, f"mail {EMAIL}", store=True, metadata={"topic": "billing"})
        streamed = await chat(k1, "stream me", store=True, stream=True, metadata={"topic": "other"})
        await chat(k1, "not stored")
        theirs = await chat(k2, "by k2", store=True)
        every = await until_listed(admin, 3)
        assert [c.id for c in every] == [billing, streamed, theirs], "oldest first"
        assert {c.id for c in await listed(k1)} == {billing, streamed}
        assert [c.id for c in await listed(k2)] == [theirs]
        assert await listed(oai(client, keys["globex-admin"])) == []

        got = await k1.chat.completions.retrieve(streamed)
        assert got.choices[0].message.content == " tok" * 3 and got.metadata == {"topic": "other"}
        assert got.model == "base"
        with pytest.raises(openai.NotFoundError) as foreign:
            await k2.chat.completions.retrieve(billing)
        with pytest.raises(openai.NotFoundError) as missing:
            await k2.chat.completions.retrieve(billing[:-4] + "0000")
        assert foreign.value.body["message"].replace(billing, "X") == missing.value.body["message"].replace(
            billing[:-4] + "0000", "X")

        assert [c.id for c in await listed(admin, metadata={"topic": "billing"})] == [billing]
        assert [c.id for c in await listed(admin, model="base", order="desc")] == [theirs, streamed, billing]
        page = await admin.chat.completions.list(limit=2)
        assert [c.id for c in page.data] == [billing, streamed] and page.has_more
        rest = await admin.chat.completions.list(limit=2, after=streamed)
        assert [c.id for c in rest.data] == [theirs] and not rest.has_more

        updated = await k1.chat.completions.update(billing, metadata={"topic": "refund"})
        assert updated.metadata == {"topic": "refund"}
        assert [c.id for c in await listed(admin, metadata={"topic": "refund"})] == [billing]
        messages = [m async for m in k1.chat.completions.messages.list(billing)]
        assert [(m.id, m.role, m.content) for m in messages] == [(f"{billing}-0", "user", "mail [email]")]

        deleted = await k1.chat.completions.delete(billing)
        assert deleted.deleted and deleted.id == billing
        with pytest.raises(openai.NotFoundError):
            await admin.chat.completions.retrieve(billing)
    database = (tmp_path / "state" / "completions.sqlite3").read_bytes()
    assert EMAIL.encode() not in database
    for path in (tmp_path / "state").iterdir():
        assert EMAIL.encode() not in path.read_bytes() if path.is_file() else True, path


async def test_capture_on_stores_all_but_store_false_and_completions_are_kept_apart(tmp_path, base, engine, keys):
    async with gateway(engine, base, tmp_path) as client:
        await set_policy(client, keys["admin"], "acme", capture="on")
        k1, admin = oai(client, keys["k1"]), oai(client, keys["admin"])
        kept = await chat(k1, "kept")
        await chat(k1, "not kept", store=False)
        legacy = await k1.completions.create(model="base", prompt="legacy")
        # The writer keeps order: once the last request's record is in, every earlier one is decided.
        assert await wait_for(lambda: asyncio.to_thread(client.app.state.data.get, "acme", legacy.id), 5)
        assert [c.id for c in await listed(admin)] == [kept]
        with pytest.raises(openai.NotFoundError):
            await admin.chat.completions.retrieve(legacy.id)
        assert await listed(oai(client, keys["globex"])) == []


async def test_nothing_is_stored_without_a_policy_that_allows_it(tmp_path, base, engine, keys):
    async with gateway(engine, base, tmp_path) as client:
        k1 = oai(client, keys["k1"])
        answer = await chat(k1, "default policy", store=True)
        assert await wait_for(lambda: asyncio.to_thread(client.app.state.data.ledger, "acme", answer), 5)
        assert await listed(oai(client, keys["admin"])) == []
    rows = sqlite3.connect(tmp_path / "state" / "completions.sqlite3").execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    assert rows, "the store exists, and holds the ledger only"


@pytest.mark.parametrize("metadata, param", [
    ({f"k{i}": "v" for i in range(17)}, "metadata"),
    ({"k" * 65: "v"}, "metadata"),
    ({"k": "v" * 513}, "metadata"),
])
async def test_metadata_over_openais_bounds_is_refused_naming_the_field(tmp_path, base, engine, keys, metadata,
                                                                       param):
    async with gateway(engine, base, tmp_path) as client:
        r = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {keys['k1']}"},
                              json={"model": "base", "messages": [{"role": "user", "content": "x"}],
                                    "store": True, "metadata": metadata})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith(param), r.text
    assert engine.requests == 0


async def test_feedback_is_traced_to_the_answer_even_when_nothing_is_stored(tmp_path, base, engine, keys):
    async with gateway(engine, base, tmp_path) as client:
        answer = await chat(oai(client, keys["k1"]), "rate me")

        async def post(key: str, **body) -> httpx.Response:
            return await client.post("/v1/feedback", json={"id": answer, **body},
                                     headers={"Authorization": f"Bearer {keys[key]}"})

        assert await wait_for(lambda: asyncio.to_thread(client.app.state.data.ledger, "acme", answer), 5)
        assert (await post("k1", rating="down", correction="better")).status_code == 200
        assert (await post("k1", rating=0.5)).status_code == 200  # replaces the first
        assert (await post("admin", rating=-1)).status_code == 200
        stored = client.app.state.data.feedback("acme", record_ids=[answer])
        assert sorted(f.rating for f in stored) == [-1.0, 0.5]
        refusals = [(await post("k2", rating="up"), 404), (await post("globex", rating="up"), 404),
                    (await post("k1", rating="sideways"), 400), (await post("k1", rating=2), 400),
                    (await post("k1", rating="up", correction="x" * 40_000), 400)]
        for response, status in refusals:
            assert response.status_code == status and response.json()["error"]["type"], response.text
        missing = await client.post("/v1/feedback", json={"id": "chatcmpl-nope", "rating": "up"},
                                    headers={"Authorization": f"Bearer {keys['k1']}"})
        assert missing.json()["error"]["message"].replace("chatcmpl-nope", answer) == \
            refusals[0][0].json()["error"]["message"]
        metrics = (await client.get("/metrics", headers={"Authorization": "Bearer admin-token"})).text
        assert 'loraplex_feedback_total{adapter="(base)",rating="down",version="base"} 2.0' in metrics
        assert 'loraplex_feedback_total{adapter="(base)",rating="up",version="base"} 1.0' in metrics
        gone = await client.delete(f"/v1/feedback/{answer}", headers={"Authorization": f"Bearer {keys['k1']}"})
        assert gone.status_code == 200
        assert [f.rating for f in client.app.state.data.feedback("acme", record_ids=[answer])] == [-1.0]


async def test_erasure_removes_a_users_records_and_is_audited_with_counts_only(tmp_path, base, engine, keys):
    async with gateway(engine, base, tmp_path) as client:
        await set_policy(client, keys["admin"], "acme", capture="on")
        k1, admin = oai(client, keys["k1"]), oai(client, keys["admin"])
        erased = [await chat(k1, "secret of ana", user="ana") for _ in range(2)]
        kept = await chat(k1, "bob's", user="bob")
        await until_listed(admin, 3)
        r = await client.delete("/admin/data", params={"tenant": "acme", "user": "ana"},
                                headers={"Authorization": f"Bearer {keys['admin']}"})
        assert r.status_code == 200 and r.json()["records"] == 2
        assert [c.id for c in await listed(admin)] == [kept]
        assert client.app.state.data.erased("acme", erased) == 2
        other = await client.delete("/admin/data", params={"tenant": "acme", "user": "ana"},
                                    headers={"Authorization": f"Bearer {keys['globex-admin']}"})
        assert other.status_code == 403
    audit = [json.loads(line) for p in (tmp_path / "state").glob("audit*") for line in p.read_text().splitlines()]
    entry = next(e for e in audit if e["action"] == "erase")
    assert entry["records"] == 2 and "secret" not in json.dumps(audit) and "ana" not in json.dumps(entry)


async def test_records_past_retention_are_deleted_by_the_gateway_holding_the_lease(tmp_path, base, engine, keys):
    async with gateway(engine, base, tmp_path, retention_interval=0.2) as client:
        await set_policy(client, keys["admin"], "acme", capture="on", retention="1s")
        admin = oai(client, keys["admin"])
        await chat(oai(client, keys["k1"]), "short-lived")
        await until_listed(admin, 1)

        async def gone() -> bool:
            return await listed(admin) == []

        assert await wait_for(gone, 10)
    audit = [json.loads(line) for p in (tmp_path / "state").glob("audit*") for line in p.read_text().splitlines()]
    assert any(e["action"] == "retention" and e["records"] == 1 and e["tenant"] == "acme" for e in audit)
