"""Routing quality at a scale this machine cannot run as real engines: loraplex's own Router (server/engine/routing.py)
choosing among simulated engines that model vLLM's LoRA tiers, against least-loaded and random routing and an
oracle's static placement.

Each engine: `slots` adapters in the running batch (vLLM --max-loras), an LRU CPU cache of `cpu_loras` adapters
(--max-cpu-loras), and a cold load from the registry for an adapter in neither. Continuous batching: every step
advances each running request by one token and costs more with more distinct adapters in the batch. Arrivals are
open-loop (Poisson) over adapters drawn by Zipf popularity. Time is simulated, so one run takes seconds.

    python -m loadtest.routing_bench [--engines 8] [--adapters 5000] [--seconds 900] [--out results.json]
"""

import argparse
import heapq
import json
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from server.engine.routing import Backend, Router


@dataclass
class Model:
    """Costs of one engine, in seconds (a small GPU model serving rank-8 adapters)."""

    slots: int = 32
    cpu_loras: int = 512
    max_running: int = 64
    cold_load: float = 0.25  # fetch from the object store and load: the bench adapter measured ~0.1-0.3 s
    warm_load: float = 0.005  # CPU cache to a slot
    step_base: float = 0.015
    step_per_adapter: float = 0.0005  # batch cost rising with distinct adapters (punica/SGMV grouping)
    step_per_request: float = 0.0001
    tokens: int = 64


@dataclass(eq=False)
class Request:
    adapter: int
    arrival: float
    cold: bool = False
    ready_at: float = 0.0  # when its adapter is loaded
    left: int = 0
    first_token: float | None = None


@dataclass(eq=False)
class SimEngine:
    """One engine's LoRA tiers and batch; `url` gives the router a stable identity to hash."""

    url: str
    model: Model
    cpu: OrderedDict = field(default_factory=OrderedDict)  # adapter -> time its cold load completes
    waiting: list = field(default_factory=list)
    running: list = field(default_factory=list)
    stepping: bool = False
    cold_loads: int = 0
    served: int = 0

    def admit(self, r: Request, now: float) -> None:
        """Queues a request; its adapter is fetched now unless the CPU cache has it (or is fetching it)."""
        ready = self.cpu.get(r.adapter)
        if ready is None:
            self.cold_loads += 1
            ready = now + self.model.cold_load
            self.cpu[r.adapter] = ready
            while len(self.cpu) > self.model.cpu_loras:
                self.cpu.popitem(last=False)
        r.cold = ready > now
        self.cpu.move_to_end(r.adapter)
        r.ready_at = max(ready, now) + self.model.warm_load
        r.left = self.model.tokens
        self.waiting.append(r)

    def step(self, now: float) -> float:
        """Moves loaded requests into the batch (within slots and size), runs one step; returns its duration."""
        active = {r.adapter for r in self.running}
        still = []
        for r in self.waiting:
            room = len(self.running) < self.model.max_running
            fits = room and (r.adapter in active or len(active) < self.model.slots)
            if r.ready_at <= now and fits:
                self.running.append(r)
                active.add(r.adapter)
            else:
                still.append(r)
        self.waiting = still
        return (self.model.step_base + self.model.step_per_adapter * len(active)
                + self.model.step_per_request * len(self.running))


class Policy:
    name = ""

    def choose(self, adapter: int, engines: list[SimEngine], backends: list[Backend]) -> int: ...


class Loraplex(Policy):
    """The gateway's own Router, on Backends whose in-flight counts the simulation keeps."""

    name = "loraplex"

    def __init__(self, backends: list[Backend], clock: "SimClock"):
        self.router = Router(backends, clock=clock)

    def choose(self, adapter, engines, backends):
        return backends.index(self.router.choose(f"adapter-{adapter}@1"))


class LeastLoaded(Policy):
    name = "least-loaded"

    def choose(self, adapter, engines, backends):
        return min(range(len(backends)), key=lambda i: (backends[i].in_flight, random.random()))


class Random(Policy):
    name = "random"

    def choose(self, adapter, engines, backends):
        return random.randrange(len(backends))


class Oracle(Policy):
    """Knows the popularity: places adapters statically, heaviest first onto the least loaded engine, and starts
    each engine's CPU cache with its most popular ones. A lower bound on cold loads for static placement."""

    name = "oracle (static)"

    def __init__(self, weights: list[float], engines: list[SimEngine]):
        load = [0.0] * len(engines)
        self.home = {}
        for adapter in sorted(range(len(weights)), key=lambda a: -weights[a]):
            i = min(range(len(engines)), key=load.__getitem__)
            self.home[adapter] = i
            load[i] += weights[adapter]
            if len(engines[i].cpu) < engines[i].model.cpu_loras:
                engines[i].cpu[adapter] = 0.0

    def choose(self, adapter, engines, backends):
        return self.home[adapter]


def zipf_weights(n: int, s: float) -> list[float]:
    raw = [1 / (k + 1) ** s for k in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def simulate(policy_name: str, args: argparse.Namespace, seed: int) -> dict:
    rng = random.Random(seed)
    random.seed(seed)
    model = Model()
    engines = [SimEngine(f"http://engine-{i}.engines:8000", model) for i in range(args.engines)]
    backends = [Backend(_Url(e.url), up=True) for e in engines]
    weights = zipf_weights(args.adapters, args.zipf)
    order = list(range(args.adapters))
    rng.shuffle(order)  # popularity is not alphabetical: adapter ids carry no hint of it
    weights = [weights[order[a]] for a in range(args.adapters)]
    clock = SimClock()
    policy = {"loraplex": lambda: Loraplex(backends, clock), "least-loaded": LeastLoaded, "random": Random,
              "oracle": lambda: Oracle(weights, engines)}[policy_name]()
    events: list = []  # (time, seq, kind, payload)
    seq = 0
    t = rng.expovariate(args.rate)
    while t < args.seconds:
        events.append((t, seq, "arrive", rng.choices(range(args.adapters), weights)[0]))
        seq += 1
        t += rng.expovariate(args.rate)
    heapq.heapify(events)
    ttft, cold, counted, served_after = [], 0, 0, [0] * len(engines)
    loads_at_warmup, probed = None, 0.0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        clock.now = now
        if now >= probed + 1.0:  # what the gateway's supervisor learns from each engine's list once a second
            probed = now
            for b, e in zip(backends, engines):
                b.adapters = frozenset(f"adapter-{a}@1" for a in e.cpu)
        if loads_at_warmup is None and now >= args.warmup:
            loads_at_warmup = sum(e.cold_loads for e in engines)
        if kind == "arrive":
            i = policy.choose(payload, engines, backends)
            r = Request(payload, now)
            engines[i].admit(r, now)
            backends[i].in_flight += 1
            if now >= args.warmup:
                counted += 1
                cold += r.cold
                served_after[i] += 1
            engine, index = engines[i], i
        else:
            index = payload
            engine = engines[index]
            engine.stepping = False
            for r in engine.running:
                r.left -= 1
                if r.first_token is None:
                    r.first_token = now
                    if r.arrival >= args.warmup:
                        ttft.append(now - r.arrival)
            finished = [r for r in engine.running if r.left == 0]
            engine.running = [r for r in engine.running if r.left > 0]
            backends[index].in_flight -= len(finished)
        if not engine.stepping and (engine.running or engine.waiting):
            duration = engine.step(now)
            if not engine.running:  # everything waits on a load: wake when the first is ready
                duration = max(min(r.ready_at for r in engine.waiting) - now, 1e-4)
            engine.stepping = True
            heapq.heappush(events, (now + duration, seq, "step", index))
            seq += 1
    measured = args.seconds - args.warmup
    ttft.sort()
    mean = sum(served_after) / len(served_after)
    return {"policy": policy.name, "requests": counted, "cold_share": cold / counted,
            "cold_loads_per_s": (sum(e.cold_loads for e in engines) - loads_at_warmup) / measured,
            "max_over_mean_load": max(served_after) / mean, "ttft_p50_s": ttft[len(ttft) // 2],
            "ttft_p99_s": ttft[int(len(ttft) * 0.99)]}


@dataclass
class SimClock:
    """Simulated time, for the router's rate estimates."""

    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Url:
    """What the Router reads of an engine client: its URL."""

    url: str


def run(args: argparse.Namespace) -> list[dict]:
    return [simulate(p, args, args.seed) for p in ("loraplex", "least-loaded", "random", "oracle")]


def table(rows: list[dict], args: argparse.Namespace) -> str:
    least = next(r for r in rows if r["policy"] == "least-loaded")
    lines = [f"{args.engines} engines, {args.adapters} adapters, Zipf {args.zipf}, {args.rate:.0f} requests/s "
             f"open loop, {args.seconds:.0f} s simulated ({args.warmup:.0f} s warm-up not counted)", "",
             "| routing | requests waiting on a cold load | cold loads/s | fewer cold loads than least-loaded | "
             "max/mean engine load | p50 TTFT | p99 TTFT |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = least["cold_loads_per_s"] / r["cold_loads_per_s"] if r["cold_loads_per_s"] else float("inf")
        lines.append(f"| {r['policy']} | {r['cold_share']:.1%} | {r['cold_loads_per_s']:.1f} | {ratio:.1f}x | "
                     f"{r['max_over_mean_load']:.2f} | {r['ttft_p50_s'] * 1000:.0f} ms | "
                     f"{r['ttft_p99_s'] * 1000:.0f} ms |")
    ours = rows[0]
    lines += ["", f"targets: cold share <= 3%: {ours['cold_share']:.1%} "
              f"({'met' if ours['cold_share'] <= 0.03 else 'MISSED'}); >= 5x fewer cold loads than least-loaded: "
              f"{least['cold_loads_per_s'] / ours['cold_loads_per_s']:.1f}x "
              f"({'met' if least['cold_loads_per_s'] >= 5 * ours['cold_loads_per_s'] else 'MISSED'}); "
              f"max/mean load <= 1.25: {ours['max_over_mean_load']:.2f} "
              f"({'met' if ours['max_over_mean_load'] <= 1.25 else 'MISSED'})"]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", type=int, default=8)
    p.add_argument("--adapters", type=int, default=5000)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--rate", type=float, default=120.0,
                   help="requests per second, all engines together (about 60%% of what the modelled engines serve)")
    p.add_argument("--seconds", type=float, default=900.0)
    p.add_argument("--warmup", type=float, default=300.0, help="seconds left out while the caches fill")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse(argv)
    rows = run(args)
    text = table(rows, args)
    print(text)
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2))
    return text


if __name__ == "__main__":
    main()
