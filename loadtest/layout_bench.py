"""The gateway before and after a change: a baseline revision (old) against the working tree or `--new REV` (new),
both in front of one vLLM engine, measured in one run.

1. Added latency: non-streamed completions of 24 tokens, each naming one of a few adapters in turn, sent one at a
   time through a gateway and straight to the engine (as `name@version`) back to back; the added latency is the
   median of these paired differences. Pairing, with the order flipped every other pair, cancels the engine's drift,
   which on a shared 2-core machine is larger than the difference measured. A bare relay (`loadtest.bare_relay`:
   uvicorn and aiohttp, no work of the gateway's) is paired the same way in the same run: the floor that any Python
   relay in front of this engine starts from.
2. Gateway CPU per request: each gateway in turn runs a round of a fixed number of requests (completions and chats,
   streamed and not, naming adapters) at a fixed concurrency, the order flipped every round so that drift in the
   machine's speed hits both alike; CPU seconds (user + system) of the gateway's own process, per request.

Writes loadtest/results/layout-before-after.md. About 8 minutes on 2 shared cores with the defaults:

    .venv/bin/python -m loadtest.layout_bench --baseline c258a88 [--new REV] [--rounds 3] [--requests 240]
"""

import argparse
import asyncio
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import psutil

from loadtest.adapters import ALL_LINEAR, AdapterFactory
from loadtest.servers import BareRelay, Engine, Gateway
from server.engine.process import free_port

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "loadtest" / "results" / "layout-before-after.md"
TOKENS = 24
PROMPTS = ["Ada and", "Today Chen", "The printer", "Where is my order"]
ADMIN = "layout-bench-admin-token"
# Set outright, not derived from the admin token: the bench then needs no server module, whose names the
# working tree may be changing while it runs.
ENGINE_KEY = "layout-bench-engine-key"
ENGINE_AUTH = {"Authorization": f"Bearer {ENGINE_KEY}"}
Adapter = tuple[str, str]  # (name, the engine's name for its version: name@version)


@dataclass
class Side:
    """One gateway under test (or the bare relay): its label, the revision it is, the tree `import server` resolves
    to for it, and its URL once started. The bare relay resolves nothing, so it is sent the engine's names."""

    label: str
    rev: str
    root: Path
    gateway: Gateway | None = None
    url: str = ""
    relay: bool = False
    added_ms: list[float] = field(default_factory=list)
    through_ms: list[float] = field(default_factory=list)
    direct_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)


def git(*args: str) -> str:
    """The output of a git command in this repository."""
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def checkout(label: str, rev: str | None, work: Path, stack: ExitStack) -> Side:
    """The working tree when `rev` is None, else a detached worktree of `rev`, removed when `stack` closes."""
    if rev is None:
        return Side(label, "working tree", ROOT)
    into = work / f"tree-{label}"
    git("worktree", "add", "--detach", str(into), rev)
    stack.callback(subprocess.run, ["git", "worktree", "remove", "--force", str(into)], cwd=ROOT,
                   capture_output=True)
    return Side(label, git("rev-parse", "--short", rev), into)


def check_tree(side: Side, work: Path) -> None:
    """Fails unless `server` imports from the side's tree with the PYTHONPATH its gateway gets (the `loraplex`
    script's own directory holds no `server`, as `work` does not, and the editable install's finder comes last)."""
    found = subprocess.run([sys.executable, "-c", "import server.cli; print(server.cli.__file__)"], cwd=work,
                           env={**os.environ, "PYTHONPATH": str(side.root)}, check=True, capture_output=True,
                           text=True).stdout.strip()
    if not Path(found).is_relative_to(side.root):
        raise RuntimeError(f"{side.label}: server imports from {found}, not from {side.root}")


def common_env(work: Path, base: Path) -> dict[str, str]:
    """The settings the engine, both gateways and the registering CLI share."""
    return {"LORAPLEX_BASE_MODEL": str(base), "LORAPLEX_REGISTRY": str(work / "registry"),
            "LORAPLEX_ADMIN_TOKEN": ADMIN, "LORAPLEX_ENGINE_API_KEY": ENGINE_KEY, "LORAPLEX_LOG_LEVEL": "warning"}


def register(old: Side, work: Path, base: Path, count: int) -> list[Adapter]:
    """`count` rank-8 adapters on all projections, registered by the old side's `loraplex adapters add` (a fixed
    revision, unlike a working tree mid-edit) into the registry every process here shares."""
    factory = AdapterFactory(base, rank=8, targets=ALL_LINEAR)
    env = {**os.environ, **common_env(work, base), "LORAPLEX_STATE_DIR": str(work / "state"),
           "PYTHONPATH": str(old.root)}
    adapters = []
    for i in range(count):
        src = factory.write(work / "src" / f"layout-{i}", seed=i)
        out = subprocess.run([sys.executable, "-m", "server.cli", "adapters", "add", f"layout-{i}", str(src),
                              "--tenant", "bench"], cwd=work, env=env, check=True, capture_output=True, text=True)
        key = re.search(r"^registered (\S+)", out.stdout, re.M)
        if key is None:
            raise RuntimeError(f"adapters add: no version in {out.stdout!r} {out.stderr[-1000:]!r}")
        adapters.append((f"layout-{i}", key.group(1)))
    return adapters


def start(sides: list[Side], work: Path, base: Path, stack: ExitStack) -> Engine:
    """One engine run from the new side's tree, and each side's gateway in front of it, all stopped by `stack`."""
    new = sides[-1]
    engine = Engine({**common_env(work, base), "LORAPLEX_STATE_DIR": str(work / "engine-state"),
                     "PYTHONPATH": str(new.root)}, work / "engine.log", cwd=new.root)
    stack.callback(engine.stop)
    engine.ready(600)
    for side in sides:
        side.gateway = Gateway({**common_env(work, base), "LORAPLEX_ENGINE_URLS": engine.url,
                                "LORAPLEX_STATE_DIR": str(work / "state"), "PYTHONPATH": str(side.root)},
                               work / f"gateway-{side.label}.log", timeout=120)
        side.url = side.gateway.url
        stack.callback(side.gateway.stop)
    return engine


def bare_relay(engine_url: str, work: Path, stack: ExitStack, name: str = "relay") -> Side:
    """The bare relay in front of the engine at `engine_url`, stopped by `stack`."""
    relay = BareRelay(engine_url, ENGINE_KEY, work / f"bare-{name}.log")
    stack.callback(relay.stop)
    return Side("bare relay", "loadtest/bare_relay.py", ROOT, url=relay.url, relay=True)


def timed(client: httpx.Client, url: str, body: dict, headers: dict[str, str]) -> tuple[float, int]:
    """Seconds one non-streamed completion took, and the tokens it made."""
    start = time.perf_counter()
    r = client.post(f"{url}/v1/completions", json=body, headers=headers)
    elapsed = time.perf_counter() - start
    if r.status_code != 200:
        raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:500]}")
    return elapsed, r.json()["usage"]["completion_tokens"]


def latency(sides: list[Side], engine_url: str, adapters: list[Adapter], pairs: int) -> list[int]:
    """`pairs` paired requests (gateway, direct) per side, one at a time; the first round over the adapters warms
    them up and is not kept. Returns the completion token counts seen."""
    tokens = []
    with httpx.Client(timeout=120) as client:
        for i in range(-len(adapters), pairs):
            name, key = adapters[i % len(adapters)]
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
            for side in sides if i % 2 == 0 else sides[::-1]:
                legs = [(side.url, key if side.relay else name, {}), (engine_url, key, ENGINE_AUTH)]
                took = {}
                for url, model, headers in legs if (i // 2) % 2 == 0 else legs[::-1]:
                    took[url], made = timed(client, url, {**body, "model": model}, headers)
                    tokens.append(made)
                if i >= 0:
                    side.through_ms.append(1000 * took[side.url])
                    side.direct_ms.append(1000 * took[engine_url])
                    side.added_ms.append(side.through_ms[-1] - side.direct_ms[-1])
    return tokens


def stub_latency(sides: list[Side], work: Path, base: Path, adapters: list[Adapter], pairs: int) -> list[Side]:
    """The same pairs in front of a stand-in engine that answers at once: what the gateway adds, without vLLM's
    jitter of tens of milliseconds in every difference. New gateways of each side, stopped before returning."""
    port = free_port()
    stub = subprocess.Popen([sys.executable, "-m", "loadtest.stub_engine", "--port", str(port), "--tokens",
                             str(TOKENS), "--gap", "0", "--serves", ",".join(key for _, key in adapters)], cwd=ROOT)
    url, measured = f"http://127.0.0.1:{port}", [Side(s.label, s.rev, s.root) for s in sides if not s.relay]
    with ExitStack() as stack:
        stack.callback(stub.wait, 10)
        stack.callback(stub.terminate)
        for side in measured:
            side.gateway = Gateway({**common_env(work, base), "LORAPLEX_ENGINE_URLS": url,
                                    "LORAPLEX_STATE_DIR": str(work / "state"), "PYTHONPATH": str(side.root)},
                                   work / f"gateway-stub-{side.label}.log", timeout=120)
            side.url = side.gateway.url
            stack.callback(side.gateway.stop)
        measured.append(bare_relay(url, work, stack, "stub"))
        latency(measured, url, adapters, pairs)
    return measured


def request(i: int, adapters: list[Adapter]) -> tuple[str, dict]:
    """The i-th request of a CPU round: completions and chats, streamed and not, in turn; adapters rotate."""
    body = {"model": adapters[i % len(adapters)][0], "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": i % 2 == 1}
    if (i // 2) % 2 == 0:
        return "/v1/completions", {**body, "prompt": PROMPTS[i % len(PROMPTS)]}
    return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}


async def cpu_round(gateway: Gateway, adapters: list[Adapter], requests: int, concurrency: int) -> float:
    """CPU milliseconds of the gateway's process per request over `requests` requests by `concurrency` clients."""
    process = psutil.Process(gateway.proc.pid)
    queue = iter(range(requests))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        async def client() -> None:
            for i in queue:
                path, body = request(i, adapters)
                async with session.post(f"{gateway.url}{path}", json=body) as r:
                    if r.status != 200:
                        raise RuntimeError(f"{gateway.url}{path} answered {r.status}: {(await r.text())[:500]}")
                    async for _ in r.content.iter_any():
                        pass

        before = sum(process.cpu_times()[:2])
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return 1000 * (sum(process.cpu_times()[:2]) - before) / requests


def cpu(sides: list[Side], adapters: list[Adapter], args: argparse.Namespace) -> None:
    """A warm-up round per side, then `args.rounds` rounds each, the order flipped every round."""
    for side in sides:
        asyncio.run(cpu_round(side.gateway, adapters, 2 * args.concurrency, args.concurrency))
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            t0 = time.perf_counter()
            side.cpu_ms.append(asyncio.run(cpu_round(side.gateway, adapters, args.requests, args.concurrency)))
            print(f"  round {r + 1} {side.label}: {side.cpu_ms[-1]:.2f} ms CPU per request "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)


def quartiles(values: list[float]) -> str:
    """The 25th and 75th percentiles, as table text."""
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.2f} to {q[2]:.2f}"


def median_ci(values: list[float]) -> tuple[float, float]:
    """A distribution-free 95% confidence interval of the median, from order statistics: how finely the pairs
    resolve the added latency (the engine's own jitter dominates each difference)."""
    ordered, n = sorted(values), len(values)
    k = max(int(n / 2 - 0.98 * n ** 0.5), 0)
    return ordered[k], ordered[n - 1 - k]


def latency_table(old: Side, new: Side, relay: Side) -> list[str]:
    """The added latency of both gateways and of the bare relay, and the new side's against the 1.5 ms target."""
    rows = ["| in front | pairs | added p50 ms | 95% CI of p50 ms | added p25 to p75 ms | through it p50 ms "
            "| direct p50 ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    for side in (old, new, relay):
        added, (low, high) = side.added_ms, median_ci(side.added_ms)
        rows.append(f"| {side.label} ({side.rev}) | {len(added)} | {statistics.median(added):.2f} | "
                    f"{low:.2f} to {high:.2f} | {quartiles(added)} | {statistics.median(side.through_ms):.2f} | "
                    f"{statistics.median(side.direct_ms):.2f} |")
    added, (low, high) = (statistics.median(new.added_ms), statistics.median(old.added_ms)), median_ci(new.added_ms)
    ratio = f"{added[0] / added[1]:.2f}" if added[1] > 0 else "n/a"
    verdict = ("is below" if high <= 1.5 else "is above" if low > 1.5 else "spans") + " the 1.5 ms target"
    floor, (floor_low, floor_high) = statistics.median(relay.added_ms), median_ci(relay.added_ms)
    return rows + ["", f"Added latency new/old: {ratio} (new {added[0]:.2f} ms, old {added[1]:.2f} ms); the new "
                       f"side's 95% interval ({low:.2f} to {high:.2f} ms) {verdict}. The bare relay, which does none "
                       f"of the gateway's work, adds {floor:.2f} ms ({floor_low:.2f} to {floor_high:.2f}): the new "
                       f"gateway's own work costs {added[0] - floor:.2f} ms above that floor."]


def cpu_table(old: Side, new: Side) -> list[str]:
    """Gateway CPU per request of both sides, round by round, and the median new/old ratio."""
    rows = [f"| round | {old.label} ({old.rev}) ms/request | {new.label} ({new.rev}) ms/request | new/old |",
            "|---:|---:|---:|---:|"]
    ratios = [n / o for o, n in zip(old.cpu_ms, new.cpu_ms)]
    for r, (o, n, ratio) in enumerate(zip(old.cpu_ms, new.cpu_ms, ratios), 1):
        rows.append(f"| {r} | {o:.2f} | {n:.2f} | {ratio:.3f} |")
    rows.append(f"| median | {statistics.median(old.cpu_ms):.2f} | {statistics.median(new.cpu_ms):.2f} | "
                f"{statistics.median(ratios):.3f} |")
    return rows + ["", f"Median of the per-round new/old ratios: {statistics.median(ratios):.3f} (target ≤ 1.05)."]


def report(sides: list[Side], stubbed: list[Side], args: argparse.Namespace, tokens: list[int], adapters: int,
           seconds: float) -> str:
    """The results as markdown."""
    old, new, relay = sides
    exact = sum(t == TOKENS for t in tokens)
    return "\n".join([
        f"# Gateway before and after: {old.rev} (old) and {new.rev} (new)", "",
        f"Base model `{args.base_model}` on vLLM (CPU, {os.cpu_count()} cores, {platform.machine()}), one engine "
        f"behind both gateways; {adapters} rank-8 adapters on all projections, named in turn. "
        f"{exact} of {len(tokens)} direct, gateway and relay answers made exactly {TOKENS} tokens (`ignore_eos`). "
        f"Whole run {seconds / 60:.1f} min.", "",
        f"## Added latency: non-streamed /v1/completions, {TOKENS} tokens, one request at a time", "",
        "Each gateway request is paired with the same body sent straight to the engine (model `name@version`) "
        "right before or after it; added = gateway − direct, per pair. The bare relay (`loadtest/bare_relay.py`: "
        "uvicorn and aiohttp relaying the bytes, no validation, routing, admission, metrics or usage) is paired the "
        "same way in the same run, sent the engine's names.", "",
        *latency_table(old, new, relay), "",
        "The same pairs over a stand-in engine (`loadtest.stub_engine`, answering at once with 24 tokens of text): "
        "the gateway's own added latency, without the engine's jitter.", "",
        *latency_table(*stubbed), "",
        f"## Gateway CPU per request: {args.requests} requests per round at {args.concurrency} clients", "",
        "Completions and chats, streamed and not, in turn; user + system CPU of the gateway process alone; "
        "rounds alternate old and new, the order flipped every round.", "",
        *cpu_table(old, new), ""])


def run(args: argparse.Namespace, work: Path, stack: ExitStack) -> str:
    """Both measurements, in `work`; what it starts and checks out is undone by `stack`. Returns the report."""
    t0 = time.monotonic()
    sides = [checkout("old", args.baseline, work, stack), checkout("new", args.new, work, stack)]
    for side in sides:
        check_tree(side, work)
    base = Path(args.base_model).resolve()
    adapters = register(sides[0], work, base, args.adapters)
    engine = start(sides, work, base, stack)
    print(f"latency: {args.pairs} pairs per gateway and the bare relay, one request at a time", flush=True)
    relay = bare_relay(engine.url, work, stack)
    tokens = latency([*sides, relay], engine.url, adapters, args.pairs)
    print(f"latency over a stand-in engine: {args.stub_pairs} pairs per gateway", flush=True)
    stubbed = stub_latency(sides, work, base, adapters, args.stub_pairs)
    print(f"gateway CPU: {args.rounds} rounds of {args.requests} requests at {args.concurrency} clients", flush=True)
    cpu(sides, adapters, args)
    return report([*sides, relay], stubbed, args, tokens, len(adapters), time.monotonic() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="git revision of the old gateway")
    p.add_argument("--new", default=None, help="git revision of the new gateway (default: the working tree)")
    p.add_argument("--rounds", type=int, default=3, help="CPU rounds per gateway")
    p.add_argument("--requests", type=int, default=240, help="requests per CPU round")
    p.add_argument("--pairs", type=int, default=200, help="latency pairs per gateway in front of vLLM")
    p.add_argument("--stub-pairs", type=int, default=1000, help="latency pairs per gateway in front of the stand-in")
    p.add_argument("--concurrency", type=int, default=12, help="clients in a CPU round")
    p.add_argument("--adapters", type=int, default=4, help="adapters registered and named in turn")
    p.add_argument("--base-model", default="models/demo-base")
    p.add_argument("--output", type=Path, default=OUTPUT)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loraplex-layout-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)  # last: failures quote the logs they need
        text = run(args, work, stack)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
