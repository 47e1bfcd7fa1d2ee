"""Weighted aliases on the real engine: a canary's share of callers, sticky per caller, then promote."""

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

from loadtest.adapters import AdapterFactory
from tests.helpers import archive, upload


def test_a_canary_splits_callers_by_user_and_keeps_each_user_on_one_version(admin, server, workdir, base_model):
    factory = AdapterFactory(base_model, 8, ["q_proj", "v_proj"])
    for seed in (1, 2):
        r = upload(admin, "canaried", archive(factory.write(workdir / "src" / f"canaried-{seed}", seed)))
        assert r.status_code == 201, r.text
    assert admin.put("/admin/adapters/canaried/aliases/stable", json={"version": 1}).status_code == 200
    r = admin.put("/admin/adapters/canaried/aliases/stable/canary", json={"version": 2, "weight": 20})
    assert r.status_code == 200, r.text
    card = next(m for m in httpx.get(f"{server.url}/v1/models").json()["data"] if m["id"] == "canaried")
    assert card["canaries"] == {"stable": {"version": 2, "weight": 20.0}}

    def answered_by(user: str) -> str:
        body = {"model": "canaried@stable", "prompt": "x", "max_tokens": 1, "user": user}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["model"]

    users = [f"user-{i}" for i in range(1000)]
    with ThreadPoolExecutor(8) as pool:
        first = dict(zip(users, pool.map(answered_by, users)))
        again = dict(zip(users[:200], pool.map(answered_by, users[:200])))
    counts = Counter(first.values())
    print(f"1,000 users on canaried@stable at 20%: {dict(counts)}")
    assert set(counts) == {"canaried@1", "canaried@2"}
    assert 0.16 <= counts["canaried@2"] / len(users) <= 0.24
    assert all(again[u] == first[u] for u in again)  # every user stays on its version
    assert admin.post("/admin/adapters/canaried/aliases/stable/promote").json()["version"] == 2
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(answered_by, users[:50])) == {"canaried@2"}
    audit = (workdir / "state" / "audit.log").read_text()
    assert '"action": "canary"' in audit and '"action": "promote"' in audit
