"""Rollouts over the real gateway app and a stand-in engine: an equal candidate goes all the way, a failing one is
rolled back before its first interval ends, both decisions audited; the judgement itself on counts."""

import asyncio
import itertools

import pytest

from loadtest.stub_engine import StubEngine
from server.rollout.rollouts import Counts, Ratings, judge, weigh
from tests.helpers.archives import archive
from tests.helpers.in_process import gateway_over, ready
from tests.helpers.polling import wait_for

ADMIN = {"Authorization": "Bearer admin-token"}


async def adapter_versions(client, adapter_factory, n: int) -> None:
    for seed in range(n):
        r = await client.post("/admin/adapters", headers=ADMIN, data={"name": "bot", "tenant": "acme"},
                              files={"file": ("bot.tar.gz", archive(adapter_factory(seed=seed)))})
        assert r.status_code == 201, r.text
    assert (await client.put("/admin/adapters/bot/aliases/stable", headers=ADMIN, json={"version": 1})).is_success


async def traffic_until(client, done, timeout: float = 60) -> dict[str, int]:
    """Streams with ever new `user` values, four at a time, until `done()`; counts the versions that answered."""
    users, seen = itertools.count(), {}

    async def one() -> None:
        body = {"adapter": "bot@stable", "prompt": "Ada", "max_tokens": 2, "stream": True, "user": f"u{next(users)}"}
        r = await client.post("/v1/completions", json=body)
        version = r.text.split('"model":"', 1)[1].split('"', 1)[0] if r.status_code == 200 else str(r.status_code)
        seen[version] = seen.get(version, 0) + 1

    async def loop() -> None:
        while not await done():
            await asyncio.gather(*(one() for _ in range(4)))

    await asyncio.wait_for(loop(), timeout)
    return seen


async def rollout_of(client) -> dict:
    return (await client.get("/admin/adapters/bot", headers=ADMIN)).json()["rollouts"][0]


async def applied(client, action: str) -> list[dict]:
    """The audit trail once `action` is in it: a decision is stored first and carried out (then audited) after."""
    def entries() -> list[dict]:
        return client.app.state.admin.audit.entries()

    assert await wait_for(lambda: any(e["action"] == action for e in entries()), 10), entries()
    return entries()


async def test_an_equal_candidate_is_rolled_out_to_everyone(tmp_path, base, adapter_factory):
    engine = await StubEngine(tokens=2, gap=0.02, serves=frozenset({"bot@1", "bot@2"})).start()
    try:
        async with gateway_over([engine.url], str(base.path), tmp_path, registry_poll=0.1) as client:
            assert await wait_for(lambda: ready(client), 30)
            await adapter_versions(client, adapter_factory, 2)
            # 20 requests a side: a p95 over fewer is one slow request on a busy machine (the full suite rolled back
            # an equal candidate so).
            spec = {"to": 2, "steps": [20, 50, 100], "interval": 0.5, "min_requests": 20}
            r = await client.post("/admin/adapters/bot/aliases/stable/rollout", headers=ADMIN, json=spec,
                                  params={"reason": "new data"})
            assert r.status_code == 201 and r.json()["weight"] == 20, r.text

            async def promoted() -> bool:
                return (await rollout_of(client))["status"] != "running"

            seen = await traffic_until(client, promoted)
            audit = await applied(client, "rollout_promote")
            record = await rollout_of(client)
            aliases = (await client.get("/admin/adapters/bot", headers=ADMIN)).json()
            metrics = (await client.get("/metrics", headers=ADMIN)).text
    finally:
        await engine.stop()
    assert record["status"] == "promoted", record
    assert 'adapter="bot@1"' in metrics and 'adapter="bot@2"' in metrics  # versions under rollout apart
    assert [d["decision"] for d in record["decisions"]] == ["step", "promote"]
    assert all(d["figures"]["candidate"]["requests"] >= 20 for d in record["decisions"])
    assert aliases["aliases"]["stable"] == 2 and aliases["canaries"] == {}
    assert set(seen) == {"bot@1", "bot@2"}, seen
    steps = [(e["action"], e["weight"]) for e in audit if e["action"].startswith("rollout_")]
    assert steps == [("rollout_start", 20), ("rollout_step", 50), ("rollout_promote", 100)]


async def test_a_failing_candidate_is_rolled_back_before_its_interval_ends(tmp_path, base, adapter_factory):
    engine = await StubEngine(tokens=2, gap=0.02, serves=frozenset({"bot@1"})).start()  # it cannot load bot@2
    try:
        async with gateway_over([engine.url], str(base.path), tmp_path, registry_poll=0.1) as client:
            assert await wait_for(lambda: ready(client), 30)
            await adapter_versions(client, adapter_factory, 2)
            spec = {"to": 2, "steps": [25, 100], "interval": 3600, "min_requests": 5}
            assert (await client.post("/admin/adapters/bot/aliases/stable/rollout", headers=ADMIN,
                                      json=spec)).status_code == 201

            async def decided() -> bool:
                return (await rollout_of(client))["status"] != "running"

            await traffic_until(client, decided)
            audit = await applied(client, "rollout_rollback")
            record = await rollout_of(client)
            after = (await client.post("/v1/completions", json={"adapter": "bot@stable", "prompt": "A",
                                                                "max_tokens": 1, "user": "anyone"})).json()
    finally:
        await engine.stop()
    assert record["status"] == "rolled_back" and "error ratio 100.00%" in record["decisions"][-1]["why"], record
    assert after["model"] == "bot@1"
    rollback = next(e for e in audit if e["action"] == "rollout_rollback")
    assert rollback["result"] == "ok" and rollback["figures"]["candidate"]["error_ratio"] == 1.0
    assert rollback["actor"] == "rollout (admin-token)"


def counts(requests: int, errors: int, seconds: float) -> Counts:
    c = Counts()
    for i in range(requests):
        c.add(i < errors, seconds)
    return c


RECORD = {"bounds": {"max_error_increase": 0.02, "latency_tolerance": 0.25}, "min_requests": 20, "step_started": 0.0,
          "interval": 60}


def test_judgement_waits_for_enough_requests_and_the_interval_then_holds_the_bounds():
    assert judge(RECORD, counts(100, 0, 0.1), counts(19, 0, 0.1), now=100)[0] == "wait"
    assert judge(RECORD, counts(100, 0, 0.1), counts(20, 0, 0.1), now=30)[0] == "wait"
    assert judge(RECORD, counts(100, 0, 0.1), counts(20, 0, 0.115), now=60)[0] == "step"  # 15% slower: noise
    assert judge(RECORD, counts(100, 0, 0.1), counts(20, 0, 0.14), now=30)[0] == "rollback"  # 40% slower
    assert judge(RECORD, counts(100, 1, 0.1), counts(20, 1, 0.1), now=60)[0] == "rollback"  # 5% against 1%
    assert judge(RECORD, counts(100, 2, 0.1), counts(50, 1, 0.1), now=60)[0] == "step"  # 2% against 2%


def test_replicas_share_a_rollout_in_the_store_and_a_lapsed_lease_passes_on(s3_url, tmp_path, base, adapter_factory):
    """Two gateways' parts over SeaweedFS: neither sees enough requests alone, their published counts together do;
    the leader stops ticking (dies), and the other takes the lease and decides."""
    from server.observability.audit import AuditLog
    from server.store.documents import StoreDocument
    from server.registry import open_registry
    from server.rollout.rollouts import LEASE_SECONDS, ROLLOUTS_FILE, Rollouts, RolloutSpec

    now = [1000.0]
    registry = open_registry(s3_url, max_age=0)
    for seed in range(2):
        registry.register("bot", adapter_factory(seed=seed), base=base, max_rank=16, tenant="acme")
    registry.set_alias("bot", "stable", 1)
    a, b = (Rollouts(StoreDocument(s3_url, ROLLOUTS_FILE), open_registry(s3_url, max_age=0),
                     AuditLog(tmp_path / name, s3_url), clock=lambda: now[0]) for name in "ab")
    a.start("bot", "stable", RolloutSpec(to=2, steps=[50, 100], interval=10, min_requests=5), "alice")
    a.tick()
    b.tick()
    assert registry.canaries("bot") == {"stable": {"version": 2, "weight": 50}}
    for replica in (a, b):
        for version in (1, 2):
            for _ in range(3):
                replica.observe("bot@stable", version, False, 0.05)
    now[0] += 11  # past the step's interval
    a.tick()  # a leads: 3 of 5 requests a side in its own counts, and b has not published yet
    assert a.of("bot")[0]["status"] == "running"
    b.tick()  # b publishes; a's lease still holds
    assert a.of("bot")[0]["status"] == "running"
    now[0] += LEASE_SECONDS + 1  # a is gone: its lease lapses
    b.tick()
    [record] = b.of("bot")
    assert record["status"] == "promoted" and record["decisions"][-1]["figures"]["candidate"]["requests"] == 6
    assert registry.aliases("bot")["stable"] == 2 and registry.canaries("bot") == {}
    assert [e["action"] for e in AuditLog(tmp_path / "c", s3_url).entries()] == ["rollout_promote"]


def test_the_evaluation_gate_refuses_a_failed_candidate_and_rolls_back_one_that_fails_midway(tmp_path, base,
                                                                                           adapter_factory):
    from server.observability.audit import AuditLog
    from server.store.documents import FileDocument
    from server.registry import Conflict, open_registry
    from server.rollout.rollouts import ROLLOUTS_FILE, Rollouts, RolloutSpec

    registry = open_registry(tmp_path / "registry")
    for seed in range(3):
        registry.register("bot", adapter_factory(seed=seed), base=base, max_rank=16, tenant="acme")
    registry.set_alias("bot", "stable", 1)
    rollouts = Rollouts(FileDocument(tmp_path / ROLLOUTS_FILE), registry, AuditLog(tmp_path / "state"))
    failed = {"passed": False, "verdict": "held-out loss 2.1 does not beat the reference's 2.0"}
    registry.record_evaluation("bot", 3, failed)
    with pytest.raises(Conflict, match="bot@3 failed its evaluation"):
        rollouts.start("bot", "stable", RolloutSpec(to=3), "alice")
    with pytest.raises(Conflict, match="bot@2 has no evaluation"):
        rollouts.start("bot", "stable", RolloutSpec(to=2, require_evaluation=True), "alice")
    rollouts.start("bot", "stable", RolloutSpec(to=2, interval=3600), "alice")
    rollouts.tick()
    assert rollouts.of("bot")[0]["status"] == "running"
    registry.record_evaluation("bot", 2, failed)  # evaluated again, on other data, while it rolls out
    rollouts.tick()
    [record] = rollouts.of("bot")
    assert record["status"] == "rolled_back" and record["decisions"][-1]["why"].startswith("its evaluation failed")
    assert registry.canaries("bot") == {} and registry.aliases("bot")["stable"] == 1


def ratings(up: int, down: int) -> Ratings:
    r = Ratings()
    for rating in [1.0] * up + [-1.0] * down:
        r.add(rating)
    return r


def test_the_feedback_gate_waits_for_ratings_then_holds_the_down_ratio_within_its_bound():
    bounds = {"max_down_increase": 0.1, "min_feedback": 10}
    assert weigh(bounds, ratings(20, 2), ratings(5, 4))[0] == "wait"
    assert weigh(bounds, ratings(18, 2), ratings(8, 2)) is None  # 20% against 10%: within +10%
    verdict, why = weigh(bounds, ratings(18, 2), ratings(7, 3))  # 30% against 10%
    assert verdict == "rollback" and "down ratings 30% of 10 against the stable version's 10% of 20" in why


@pytest.mark.parametrize("down_on, outcome", [(2, "rolled_back"), (1, "promoted")])
async def test_a_rollout_with_the_feedback_gate_follows_what_callers_rate(tmp_path, base, adapter_factory,
                                                                          down_on, outcome):
    """Callers rate every answer of version `down_on` down and the other up: the candidate (2) is rolled back when
    its answers are rated worse, and promoted when they are rated better."""
    engine = await StubEngine(tokens=2, serves=frozenset({"bot@1", "bot@2"})).start()
    try:
        async with gateway_over([engine.url], str(base.path), tmp_path, registry_poll=0.1) as client:
            assert await wait_for(lambda: ready(client), 30)
            await adapter_versions(client, adapter_factory, 2)
            # Only the feedback gate may decide: latency on a shared machine is noise at this scale.
            spec = {"to": 2, "steps": [50, 100], "interval": 0.5, "min_requests": 4, "max_down_increase": 0.2,
                    "min_feedback": 4, "latency_tolerance": 1000}
            assert (await client.post("/admin/adapters/bot/aliases/stable/rollout", headers=ADMIN,
                                      json=spec)).status_code == 201
            users = itertools.count()

            async def rate_one() -> None:
                body = {"adapter": "bot@stable", "prompt": "Ada", "max_tokens": 2, "user": f"u{next(users)}"}
                answer = (await client.post("/v1/completions", json=body)).json()
                rating = "down" if answer["model"] == f"bot@{down_on}" else "up"

                async def rated() -> bool:
                    r = await client.post("/v1/feedback", json={"id": answer["id"], "rating": rating})
                    return r.status_code == 200

                assert await wait_for(rated, 5)

            async def decided() -> bool:
                return (await rollout_of(client))["status"] != "running"

            async def rate_until_decided() -> None:
                while not await decided():
                    await asyncio.gather(*(rate_one() for _ in range(4)))

            await asyncio.wait_for(rate_until_decided(), 60)
            record = await rollout_of(client)
    finally:
        await engine.stop()
    assert record["status"] == outcome, record["decisions"]
    if outcome == "rolled_back":
        assert "down ratings 100%" in record["decisions"][-1]["why"]
