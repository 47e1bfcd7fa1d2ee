"""Soak: steady load over many adapters while adapters are uploaded, aliased and deleted, with injected faults.

Starts its own gateway and engine on loopback, sends requests at a fixed rate for --duration seconds, and
meanwhile uploads new versions over the admin API, moves the `stable` alias, deletes old versions and whole
adapters, drops streams mid-way (client disconnects) and sends bursts past the in-flight limit (429s).
Passes when no request failed except the intended 429s, neither gateway nor engine grew more than
--max-growth in resident memory after the warm-up, and `loraplex registry check` is clean.

    python -m loadtest.soak --duration 600 --rate 4 --adapters 24 --out soak.json
"""

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from loadtest.adapters import AdapterFactory
from loadtest.servers import LOADER, Gateway
from server.core import base_model as basemodel
from server.registry.archive import pack_archive
from server.registry.directory import DirectoryRegistry

ADMIN_TOKEN = "soak-admin-token"
IN_FLIGHT_LIMIT = 8


class Soak:
    def __init__(self, args, gateway: Gateway, factory: AdapterFactory, work: Path):
        self.args, self.gw, self.factory, self.work = args, gateway, factory, work
        self.rng = random.Random(args.seed)
        self.statuses: Counter = Counter()
        self.failures: list[str] = []
        self.faults: Counter = Counter()
        self.churn: Counter = Counter()
        self.memory: list[tuple[float, dict]] = []
        self.seeds = iter(range(10_000, 10**9))
        self.names = [f"soak-{i}" for i in range(args.adapters)]

    async def request(self, client: httpx.AsyncClient, body: dict, drop_after_first: bool = False) -> None:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        try:
            if body.get("stream"):
                async with client.stream("POST", path, json=body) as r:
                    if r.status_code == 200 and drop_after_first:
                        async for _ in r.aiter_raw():
                            break
                        self.faults["client disconnects"] += 1
                        self.statuses["dropped"] += 1
                        return
                    text = (await r.aread()).decode()
                    ok = r.status_code != 200 or text.rstrip().endswith("data: [DONE]")
                    status = r.status_code if ok else "truncated stream"
            else:
                r = await client.post(path, json=body)
                status, text = r.status_code, r.text
        except httpx.HTTPError as e:
            status, text = type(e).__name__, str(e)
        self.statuses[status] += 1
        if status not in (200, 429):
            self.failures.append(f"{status} {body.get('adapter')}: {text[:300]}")

    def body(self) -> dict:
        rng = self.rng
        body: dict = {"max_tokens": rng.randint(4, 32), "temperature": rng.choice([0, 0.8]),
                      "stream": rng.random() < 0.5}
        if rng.random() < 0.5:
            body["prompt"] = rng.choice(["Ada and", "The ticket says", "Once upon a time"])
        else:
            body["messages"] = [{"role": "user", "content": rng.choice(["hello", "reset my password", "hi"])}]
        if rng.random() < 0.9:
            name = rng.choice(self.names)
            body["adapter"] = name if rng.random() < 0.5 else f"{name}@stable"
        return body

    async def load(self, client: httpx.AsyncClient, until: float) -> None:
        tasks = set()
        interval = 1 / self.args.rate
        next_at = time.monotonic()
        while next_at < until:
            body = self.body()
            drop = body["stream"] and self.rng.random() < 0.05
            task = asyncio.create_task(self.request(client, body, drop))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*tasks)

    async def bursts(self, client: httpx.AsyncClient, until: float) -> None:
        """Every 30 s, twice the in-flight limit at once: the excess must get 429, the rest answers."""
        while time.monotonic() + 30 < until:
            await asyncio.sleep(30)
            burst = [{"prompt": "Ada and", "max_tokens": 64, "ignore_eos": True}] * (2 * IN_FLIGHT_LIMIT)
            await asyncio.gather(*(self.request(client, b) for b in burst))
            self.faults["overload bursts"] += 1

    async def upload(self, admin: httpx.AsyncClient, name: str) -> int:
        src = await asyncio.to_thread(self.factory.write, self.work / "src" / f"{name}-{next(self.seeds)}",
                                      next(self.seeds))
        data = await asyncio.to_thread(pack_archive, src)
        r = await admin.post("/admin/adapters", data={"name": name, "tenant": "soak"},
                             files={"file": ("a.tar.gz", data)})
        if r.status_code != 201:
            self.failures.append(f"upload {name}: {r.status_code} {r.text[:300]}")
            return 0
        self.churn["uploads"] += 1
        return r.json()["version"]

    async def admin_churn(self, admin: httpx.AsyncClient, client: httpx.AsyncClient, until: float) -> None:
        """New versions, alias moves and deletes of old versions; now and then a whole adapter comes and goes."""
        round_ = 0
        while time.monotonic() < until:
            round_ += 1
            name = self.rng.choice(self.names)
            version = await self.upload(admin, name)
            if version:
                r = await admin.put(f"/admin/adapters/{name}/aliases/stable", json={"version": version})
                self.churn["alias moves"] += r.status_code == 200
                shown = (await admin.get(f"/admin/adapters/{name}")).json()
                # Versions two behind the newest: no request can still be resolving to them.
                for old in [v["version"] for v in shown["versions"]][:-2]:
                    r = await admin.delete(f"/admin/adapters/{name}/versions/{old}")
                    self.churn["version deletes"] += r.status_code == 200
            if round_ % 5 == 0:
                temp = f"soak-tmp-{round_}"
                if await self.upload(admin, temp):
                    await self.request(client, {"prompt": "Ada", "max_tokens": 8, "adapter": temp, "stream": True})
                    r = await admin.delete(f"/admin/adapters/{temp}")
                    self.churn["adapter deletes"] += r.status_code == 200
            await asyncio.sleep(self.args.churn_every)

    async def sample_memory(self, until: float) -> None:
        while time.monotonic() < until:
            self.memory.append((time.monotonic(), self.gw.rss_mb()))
            await asyncio.sleep(5)
        self.memory.append((time.monotonic(), self.gw.rss_mb()))

    async def run(self) -> None:
        start = time.monotonic()
        until = start + self.args.duration
        timeout = httpx.Timeout(120)
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(base_url=self.gw.url, timeout=timeout, limits=limits) as client, \
                httpx.AsyncClient(base_url=self.gw.url, timeout=timeout,
                                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
            await asyncio.gather(self.load(client, until), self.bursts(client, until),
                                 self.admin_churn(admin, client, until), self.sample_memory(until))
        self.started = start

    def memory_growth(self) -> dict:
        """Median of the first three samples after the warm-up against the median of the last three."""
        warm = self.started + self.args.warmup
        after = [m for t, m in self.memory if t >= warm] or [m for _, m in self.memory]
        out = {}
        for part in ("gateway", "engine"):
            first = statistics.median(m[part] for m in after[:3])
            last = statistics.median(m[part] for m in after[-3:])
            out[part] = {"start_mb": round(first, 1), "end_mb": round(last, 1),
                         "growth": round((last - first) / first, 4)}
        return out


def prepare(args, work: Path) -> tuple[AdapterFactory, Path]:
    base_dir = Path(args.base_model)
    base = basemodel.load(str(base_dir))
    factory = AdapterFactory(base_dir, rank=8, targets=["q_proj", "v_proj", "o_proj"])
    registry = DirectoryRegistry(work / "registry")
    for i in range(args.adapters):
        src = factory.write(work / "src" / f"soak-{i}", seed=i)
        version = registry.register(f"soak-{i}", src, base=base, max_rank=64,
                                    tenant="soak", origin="soak")
        registry.set_alias(f"soak-{i}", "stable", version.version)
    return factory, work / "registry"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600, help="seconds of load")
    p.add_argument("--warmup", type=float, default=None, help="seconds before the memory baseline (default 20%%)")
    p.add_argument("--rate", type=float, default=4, help="requests per second (open loop)")
    p.add_argument("--adapters", type=int, default=24, help="adapters under load")
    p.add_argument("--churn-every", type=float, default=3, help="seconds between admin changes")
    p.add_argument("--max-growth", type=float, default=0.05, help="allowed RSS growth after warm-up")
    p.add_argument("--base-model", default="models/demo-base")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here too")
    args = p.parse_args()
    args.warmup = args.duration * 0.2 if args.warmup is None else args.warmup
    work = Path(tempfile.mkdtemp(prefix="loraplex-soak-"))
    factory, registry = prepare(args, work)
    env = {"LORAPLEX_BASE_MODEL": str(Path(args.base_model).resolve()), "LORAPLEX_REGISTRY": str(registry),
           "LORAPLEX_STATE_DIR": str(work / "state"), "LORAPLEX_ADMIN_TOKEN": ADMIN_TOKEN,
           "LORAPLEX_MAX_LORAS": "4", "LORAPLEX_MAX_RESIDENT_ADAPTERS": "6",
           "LORAPLEX_MAX_IN_FLIGHT_PER_ENGINE": str(IN_FLIGHT_LIMIT), "LORAPLEX_LOG_LEVEL": "warning"}
    gateway = Gateway(env, work / "gateway.log")
    try:
        soak = Soak(args, gateway, factory, work)
        asyncio.run(soak.run())
        memory = soak.memory_growth()
    finally:
        gateway.stop()
    check = subprocess.run([LOADER, "registry", "check"], env=gateway.env, capture_output=True, text=True)
    sent = sum(soak.statuses.values())
    report = {
        "duration_s": args.duration, "rate": args.rate, "adapters": args.adapters,
        "requests": sent, "statuses": {str(k): v for k, v in soak.statuses.items()},
        "http_429": soak.statuses[429], "http_5xx": sum(v for k, v in soak.statuses.items()
                                                        if isinstance(k, int) and k >= 500),
        "failures": len(soak.failures), "first_failures": soak.failures[:10],
        "faults_injected": dict(soak.faults), "churn": dict(soak.churn), "memory": memory,
        "registry_check": {"returncode": check.returncode, "output": (check.stdout + check.stderr).strip()[-500:]},
        "workdir": str(work),
    }
    report["passed"] = (not soak.failures and check.returncode == 0 and soak.statuses[200] > 0
                        and all(m["growth"] < args.max_growth for m in memory.values()))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    if report["passed"]:
        shutil.rmtree(work, ignore_errors=True)  # kept on failure, for its gateway log
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
