"""Shadow traffic over the real gateway app and a stand-in engine: copies are compared and counted, shed past the
cap, and never change or fail what the caller gets."""

import asyncio

from loadtest.stub_engine import StubEngine
from tests.helpers.archives import archive
from tests.helpers.calls import series
from tests.helpers.in_process import gateway_over, ready
from tests.helpers.polling import wait_for

ADMIN = {"Authorization": "Bearer admin-token"}


async def two_versions(client, adapter_factory, shadow: dict) -> None:
    for seed in range(2):
        r = await client.post("/admin/adapters", headers=ADMIN, data={"name": "bot", "tenant": "acme"},
                              files={"file": ("bot.tar.gz", archive(adapter_factory(seed=seed)))})
        assert r.status_code == 201, r.text
    assert (await client.put("/admin/adapters/bot/aliases/stable", headers=ADMIN, json={"version": 1})).is_success
    r = await client.put("/admin/adapters/bot/aliases/stable/shadow", headers=ADMIN, json=shadow)
    assert r.status_code == 200, r.text


async def metric(client, name: str, **labels) -> float:
    return sum(series((await client.get("/metrics", headers=ADMIN)).text, name, **labels))


async def ask(client, n: int) -> list[int]:
    body = {"adapter": "bot@stable", "prompt": "Ada", "max_tokens": 2}
    answers = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(n)))
    assert all(a.json()["model"] == "bot@1" for a in answers if a.status_code == 200)
    return [a.status_code for a in answers]


async def test_copies_are_compared_and_counted(tmp_path, base, adapter_factory):
    engine = await StubEngine(tokens=2, serves=frozenset({"bot@1", "bot@2"})).start()
    try:
        async with gateway_over([engine.url], str(base.path), tmp_path) as client:
            assert await wait_for(lambda: ready(client), 30)
            await two_versions(client, adapter_factory, {"version": 2, "percent": 100})
            assert await ask(client, 6) == [200] * 6
            assert await wait_for(lambda: _equals(client, "loraplex_shadow_requests_total", 6, result="completed",
                                                  adapter="bot@2"), 10)
            assert await metric(client, "loraplex_shadow_exact_matches_total", adapter="bot@2") == 6
            assert await metric(client, "loraplex_shadow_length_ratio_count", adapter="bot@2") == 6
            shown = (await client.get("/admin/adapters/bot", headers=ADMIN)).json()["shadows"]
            assert shown == {"stable": {"version": 2, "percent": 100}}
    finally:
        await engine.stop()
    assert engine.requests == 12 and sum(1 for r in engine.request_ids if r.endswith("-shadow")) == 6


async def _equals(client, name: str, value: float, **labels) -> bool:
    return await metric(client, name, **labels) == value


async def test_a_failing_shadow_never_fails_the_caller_and_copies_past_the_cap_are_shed(tmp_path, base,
                                                                                          adapter_factory):
    engine = await StubEngine(tokens=2, gap=0.05, serves=frozenset({"bot@1"})).start()  # bot@2 fails to load
    try:
        async with gateway_over([engine.url], str(base.path), tmp_path, shadow_max_in_flight=2) as client:
            assert await wait_for(lambda: ready(client), 30)
            await two_versions(client, adapter_factory, {"version": 2, "percent": 100})
            assert await ask(client, 8) == [200] * 8
            assert await wait_for(lambda: _equals(client, "loraplex_shadow_requests_total", 8), 10)
            failed = await metric(client, "loraplex_shadow_requests_total", result="failed")
            shed = await metric(client, "loraplex_shadow_requests_total", result="shed")
            assert failed + shed == 8 and failed >= 2 and shed >= 1, (failed, shed)
            assert (await client.delete("/admin/adapters/bot/aliases/stable/shadow", headers=ADMIN)).is_success
            assert await ask(client, 2) == [200, 200]
            assert await metric(client, "loraplex_shadow_requests_total") == 8  # no copies once it is off
    finally:
        await engine.stop()
