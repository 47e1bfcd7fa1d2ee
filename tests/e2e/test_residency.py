"""More adapters than an engine keeps, under load (issue 24): a gateway and engine of their own with
MAX_RESIDENT_ADAPTERS=8 and MAX_LORAS=4, 96 adapters, 32 concurrent clients streaming and not, while versions are
uploaded and deleted. Every request is answered; 404 only for a version deleted before it was asked for."""

import asyncio
import json
import os
import random
import time

import httpx
import pytest

from loadtest.adapters import AdapterFactory
from loadtest.servers import Gateway
from server.core import base_model as basemodel
from server.registry.directory import DirectoryRegistry
from tests.helpers.archives import archive
from tests.helpers.calls import complete, same, series
from tests.helpers.e2e import ADMIN_AUTH, ADMIN_TOKEN

ADAPTERS, CLIENTS, CHURNED = 96, 32, 8
SECONDS = float(os.environ.get("LORAPLEX_RESIDENCY_SECONDS", "180"))
PROMPTS = ["How do I reset my password?", "Where is my order?", "Can I change the plan?", "Is there a refund?"]


@pytest.fixture(scope="module")
def crowded(workdir, base_model, tmp_path_factory):
    """A gateway and engine holding far fewer adapters than are asked for; the adapters' sources by name."""
    work = tmp_path_factory.mktemp("residency")
    info, registry = basemodel.load(str(base_model)), DirectoryRegistry(work / "registry")
    factory, sources = AdapterFactory(base_model, rank=8, targets=["q_proj", "v_proj"]), {}
    for i in range(ADAPTERS):
        sources[f"r{i}"] = factory.write(work / "src" / f"r{i}", seed=1000 + i)
        registry.register(f"r{i}", sources[f"r{i}"], base=info, max_rank=64, tenant="acme")
    env = {"LORAPLEX_BASE_MODEL": str(base_model), "LORAPLEX_REGISTRY": str(work / "registry"),
           "LORAPLEX_STATE_DIR": str(work / "state"), "LORAPLEX_ADMIN_TOKEN": ADMIN_TOKEN,
           "LORAPLEX_MAX_RESIDENT_ADAPTERS": "8", "LORAPLEX_MAX_LORAS": "4"}
    gateway = Gateway(env, work / "serve.log")
    try:
        yield gateway, sources
    finally:
        gateway.stop()


class Churn:
    """Uploads new versions of some adapters and deletes old ones while the clients run."""

    def __init__(self, client: httpx.AsyncClient, sources: dict):
        self.client, self.sources = client, sources
        self.latest = {name: 1 for name in sources}
        self.deleted: set[str] = set()
        self.uploads = 0

    async def run(self, until: float) -> None:
        rng = random.Random(7)
        while time.monotonic() < until - 5:
            name = f"r{rng.randrange(CHURNED)}"
            old = self.latest[name]
            # A stream still running on the old version when it is deleted: it must finish on its files.
            body = {"adapter": f"{name}@{old}", "prompt": PROMPTS[0], "max_tokens": 48, "ignore_eos": True,
                    "stream": True}
            lines = []
            async with self.client.stream("POST", "/v1/completions", json=body) as held:
                assert held.status_code == 200
                async for line in held.aiter_lines():
                    if line.startswith("data: ") and len(lines) == 0:
                        await self.replace(name, old)
                    lines.append(line)
            assert lines[-1:] == ["data: [DONE]"] or "data: [DONE]" in lines, lines[-3:]
            await asyncio.sleep(1)

    async def replace(self, name: str, old: int) -> None:
        r = await self.client.post("/admin/adapters", data={"name": name, "tenant": "acme"},
                                   files={"file": (f"{name}.tar.gz", archive(self.sources[name]))})
        assert r.status_code == 201, r.text
        self.latest[name] = r.json()["version"]
        self.uploads += 1
        self.deleted.add(f"{name}@{old}")  # from now on a request for it may get 404
        r = await self.client.delete(f"/admin/adapters/{name}/versions/{old}")
        assert r.status_code == 200, r.text


async def client_loop(client: httpx.AsyncClient, churn: Churn, rng: random.Random, until: float,
                      outcomes: list) -> None:
    while time.monotonic() < until:
        name = f"r{rng.randrange(ADAPTERS)}"
        adapter = f"{name}@{churn.latest[name]}"
        body = {"model": "demo-base", "adapter": adapter, "prompt": rng.choice(PROMPTS), "max_tokens": 8,
                "temperature": 0, "stream": rng.random() < 0.5}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            text = (await r.aread()).decode()
        ok = r.status_code == 200 and (not body["stream"] or text.rstrip().endswith("data: [DONE]"))
        if ok:
            outcomes.append("200")
        elif r.status_code == 404 and adapter in churn.deleted:
            outcomes.append("404 deleted")
        else:
            outcomes.append(f"{r.status_code} {adapter} stream={body['stream']}: {text[:300]}")


async def drive(url: str, sources: dict) -> tuple[list, Churn]:
    until = time.monotonic() + SECONDS
    limits = httpx.Limits(max_connections=CLIENTS + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client, \
            httpx.AsyncClient(base_url=url, timeout=120, headers=ADMIN_AUTH) as admin:
        churn, outcomes = Churn(admin, sources), []
        await asyncio.gather(churn.run(until), *(client_loop(client, churn, random.Random(i), until, outcomes)
                                                 for i in range(CLIENTS)))
    return outcomes, churn


def test_every_request_is_answered_with_far_more_adapters_than_resident(crowded, reference):
    gateway, sources = crowded
    outcomes, churn = asyncio.run(drive(gateway.url, sources))
    failures = [o for o in outcomes if o not in ("200", "404 deleted")]
    print(f"{len(outcomes)} requests: {outcomes.count('200')} 200, {outcomes.count('404 deleted')} 404 for deleted "
          f"versions; {churn.uploads} uploads and version deletes")
    assert failures == [], failures[:10]
    assert outcomes.count("200") > 300 and churn.uploads >= 5
    with httpx.Client(base_url=gateway.url, timeout=120, headers=ADMIN_AUTH) as admin:
        metrics = admin.get("/metrics").text
        engine = admin.get("/metrics/engine/0").text
        assert sum(series(metrics, "loraplex_engine_restarts_total")) == 0
        assert sum(series(engine, "loraplex_engine_adapter_evictions_total", reason="lru")) > 50
        assert sum(series(engine, "loraplex_engine_adapter_evictions_total", reason="unloaded")) >= 1
        assert sum(series(engine, "loraplex_engine_adapter_load_failures_total")) == 0
        for name in ("r20", "r50", "r95", "r0"):
            adapter = f"{name}@{churn.latest[name]}"
            choice = complete(admin, PROMPTS[0], max_tokens=8, adapter=adapter)["choices"][0]
            assert same(choice, reference.complete(sources[name], PROMPTS[0], 8)), adapter
    log = gateway.log.read_text()
    assert "EngineDeadError" not in log and "could not be loaded" not in log, json.dumps(log[-3000:])
