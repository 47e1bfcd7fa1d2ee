"""Compositions named per request, timed on the demo model: the first request with a new recipe (composed,
registered and loaded on the way) and later ones against a plain adapter of equal rank, interleaved in one run.

    .venv/bin/python -m loadtest.compose_bench [--recipes 6] [--pairs 40]

Writes loadtest/results/compose.md."""

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from loadtest.adapters import AdapterFactory
from loadtest.servers import LOADER, Gateway

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "loadtest" / "results" / "compose.md"
BASE = ROOT / "models" / "demo-base"
SOURCES = 6  # rank-4 adapters; every recipe takes two, so every composition is of rank 8
TOKENS = 8


def ask(client: httpx.Client, adapter: object) -> tuple[float, str]:
    """Seconds for one greedy completion naming `adapter`, and the version that answered."""
    started = time.perf_counter()
    r = client.post("/v1/completions", json={"prompt": "Ada and", "max_tokens": TOKENS, "temperature": 0,
                                             "ignore_eos": True, "adapter": adapter})
    elapsed = time.perf_counter() - started
    r.raise_for_status()
    return elapsed, r.json()["model"]


def setup(work: Path) -> dict[str, str]:
    """The gateway's settings, with SOURCES adapters and one plain rank-8 version (`plain`, a composition
    registered by the CLI: the same shapes as the per-request ones) registered."""
    env = {**os.environ, "LORAPLEX_BASE_MODEL": str(BASE), "LORAPLEX_REGISTRY": str(work / "registry"),
           "LORAPLEX_STATE_DIR": str(work / "state"), "LORAPLEX_MAX_LORA_RANK": "16"}
    factory = AdapterFactory(BASE, 4, scale=0.1)
    for i in range(SOURCES):
        subprocess.run([LOADER, "adapters", "add", f"s{i}", str(factory.write(work / f"s{i}", i))], env=env,
                       check=True, capture_output=True)
    subprocess.run([LOADER, "adapters", "compose", "plain", "--from", "s0@1:0.5", "--from", "s1@1:0.5"], env=env,
                   check=True, capture_output=True)
    return env


def run(recipes: int, pairs: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        env = setup(Path(tmp))
        gateway = Gateway(env, Path(tmp) / "gateway.log", timeout=300)
        try:
            with httpx.Client(base_url=gateway.url, timeout=120) as client:
                for _ in range(3):  # the engine's first requests warm its LoRA paths up
                    ask(client, "plain")
                firsts = [ask(client, [{"name": f"s{i % SOURCES}", "weight": 0.5},
                                       {"name": f"s{(i + 1) % SOURCES}", "weight": round(0.1 + i / 100, 2)}])[0]
                          for i in range(recipes)]
                recipe = [{"name": "s2", "weight": 0.5}, {"name": "s3", "weight": 0.5}]
                composed, plain = [], []
                for i in range(pairs):  # interleaved, the order flipped every other pair
                    for which in (("c", "p") if i % 2 else ("p", "c")):
                        (composed if which == "c" else plain).append(ask(client, recipe if which == "c"
                                                                         else "plain")[0])
            log = (Path(tmp) / "gateway.log").read_text()
        finally:
            gateway.stop()
    composing = [float(line.rsplit(" in ", 1)[1].split()[0]) for line in log.splitlines()
                 if "composed composed." in line]
    return report(firsts, composing, composed, plain)


def report(firsts: list[float], composing: list[float], composed: list[float], plain: list[float]) -> str:
    ms = [f"{1000 * x:.0f}" for x in firsts]
    ratio = statistics.median(composed) / statistics.median(plain)
    return "\n".join([
        "# Compositions per request",
        "",
        f"`python -m loadtest.compose_bench` on {platform.node()} ({os.cpu_count()} cores), demo model, two rank-4 "
        f"sources per recipe (rank 8), {TOKENS}-token greedy completions, one at a time.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| first request of a new recipe, each (ms) | {', '.join(ms)} |",
        f"| first request, median / max (ms) | {1000 * statistics.median(firsts):.0f} / {1000 * max(firsts):.0f} |",
        f"| of which compose + register in the gateway, median (ms) | {1000 * statistics.median(composing):.0f} |",
        f"| later requests, composed recipe, median (ms) | {1000 * statistics.median(composed):.1f} |",
        f"| later requests, plain rank-8 adapter, median (ms) | {1000 * statistics.median(plain):.1f} |",
        f"| composed / plain | {ratio:.3f} |",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipes", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=40)
    args = parser.parse_args()
    text = run(args.recipes, args.pairs)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
