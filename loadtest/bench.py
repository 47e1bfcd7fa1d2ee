"""Serving benchmarks, each pair measured side by side in alternating rounds; writes BENCHMARKS.md's tables.

1. gateway overhead: loraplex against the same vLLM engine called directly;
2. loraplex against a naive transformers + PEFT server, over 8 and 64 adapters, and its grouped LoRA ops against
   vLLM's own CPU ops;
3. adapter-count sweep (1, 8, 64, 512, Zipf popularity): loraplex's defaults and a hand-set --max-loras, each
   point on both engines back to back;
4. merged-weight ceiling: one adapter through LoRA against the same adapter merged into the base;
5. cold start: registration (CLI and admin upload) to first token;
6. routing quality over simulated engines at a scale this machine cannot run (loadtest/routing_bench.py).

    python -m loadtest.bench            # everything, about 27 minutes on 2 cores
    python -m loadtest.bench --quick    # the overhead pair and one sweep point, a few minutes
"""

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import httpx
import psutil

from loadtest import routing_bench
from loadtest.adapters import ALL_LINEAR, AdapterFactory
from loadtest.servers import LOADER, BareRelay, Gateway, ObjectStore, wait_ready
from server.core import base_model as basemodel
from server.core.config import Settings
from server.engine.process import free_port
from server.registry.archive import pack_archive
from server.registry.directory import DirectoryRegistry
from server.tenancy.keys import engine_key

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "loadtest" / "results"
ADMIN = "bench-admin-token"
ENGINE_KEY = engine_key(Settings(), ADMIN)  # what its gateways derive, or LORAPLEX_ENGINE_API_KEY
PARTS = ["overhead", "sweep", "cold", "s3-cold", "naive", "lora-ops", "merged", "tuned", "routing"]
DEFAULTS = "defaults (max-loras 32, max-lora-rank 16)"


class Bench:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        RESULTS.mkdir(parents=True, exist_ok=True)
        earlier = RESULTS / ("bench-quick.json" if args.quick else "bench.json")
        partial = set(args.only) != set(PARTS) and not args.quick
        self.results: dict = json.loads(earlier.read_text()) if partial and earlier.exists() else {}
        self.results["config"] = {k: str(v) for k, v in vars(args).items()}

    def load(self, url: str, label: str, adapters: list[str] = (), field: str = "adapter", model: str = "",
             concurrency: int | None = None, plot: bool = False, cpu_of: Gateway | None = None,
             no_stream: bool = False, relay: BareRelay | None = None) -> dict:
        """One run of the load generator, in its own process (Locust patches the standard library); with
        `cpu_of`, also the CPU seconds that gateway process, its engine's vLLM API server and `relay` spent
        meanwhile."""
        label = f"quick-{label}" if self.args.quick else label  # its plots must not replace the full run's
        out = self.work / f"{label}.json"
        cmd = [sys.executable, "-m", "loadtest.load", "--url", url, "--model", model or self.model_name,
               "--adapters", ",".join(adapters), "--adapter-field", field, "--zipf", "1.0",
               "--concurrency", str(concurrency or self.args.concurrency), "--duration", str(self.args.duration),
               "--warmup", str(self.args.warmup), "--output-tokens", str(self.args.output_tokens), "--json", str(out),
               # The engines' key: vLLM called directly demands it; the gateways, with no API keys, ignore it.
               "--api-key", ENGINE_KEY]
        if plot:
            cmd += ["--plot", str(RESULTS / f"{label}.png"), "--markdown", str(RESULTS / f"{label}.md")]
        if no_stream:
            cmd.append("--no-stream")
        watched = {"gateway": psutil.Process(cpu_of.proc.pid), "vllm_api": cpu_of.api_server()} if cpu_of else {}
        if relay is not None:
            watched["relay"] = psutil.Process(relay.proc.pid)
        before = {k: sum(p.cpu_times()[:2]) for k, p in watched.items()}
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        report = json.loads(out.read_text())
        for k, p in watched.items():
            report[f"{k}_cpu_s"] = sum(p.cpu_times()[:2]) - before[k]
        t, o = report["throughput"], report["overall"]
        if not o["requests"] or o["errors"] == o["requests"]:
            raise RuntimeError(f"{label}: no request succeeded: {report['errors']}")
        print(f"  {label}: {t['output_tokens_per_s']:.1f} tok/s, {t['requests_per_s']:.2f} req/s, "
              f"e2e p50 {o['e2e_s']['p50'] * 1000:.1f} ms p99 {o['e2e_s']['p99'] * 1000:.1f} ms, "
              f"errors {o['errors']}", flush=True)
        time.sleep(2)  # what the load left running in the server settles before the next run
        return report

    def pair(self, name: str, sides: dict[str, dict], rounds: int | None = None) -> dict:
        """Alternating rounds of each side; medians of throughput and latency per side."""
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(rounds or self.args.rounds):
            for side, kw in (sides.items() if r % 2 == 0 else reversed(list(sides.items()))):
                runs[side].append(self.load(label=f"{name}-{side.replace(' ', '-')}-{r}", plot=(r == 0), **kw))
        out = {}
        for side, reports in runs.items():
            out[side] = {
                "output_tokens_per_s": statistics.median(x["throughput"]["output_tokens_per_s"] for x in reports),
                "requests_per_s": statistics.median(x["throughput"]["requests_per_s"] for x in reports),
                "e2e_p50_ms": statistics.median(x["overall"]["e2e_s"]["p50"] for x in reports) * 1000,
                "e2e_p99_ms": statistics.median(x["overall"]["e2e_s"]["p99"] for x in reports) * 1000,
                "ttft_p50_ms": statistics.median(x["overall"]["ttft_s"]["p50"] for x in reports) * 1000,
                "errors": sum(x["overall"]["errors"] for x in reports),
                "rounds_tok_s": [round(x["throughput"]["output_tokens_per_s"], 1) for x in reports],
            }
            for process in ("gateway", "vllm_api", "relay"):
                if f"{process}_cpu_s" in reports[0]:
                    # Per request the generator sent in the whole run, warm-up included, as the CPU time was.
                    out[side][f"{process}_cpu_ms_per_request"] = statistics.median(
                        x[f"{process}_cpu_s"] * 1000 / len(x["timeline"]) for x in reports)
        self.results[name] = out
        self.save()
        return out

    def save(self) -> None:
        (RESULTS / ("bench-quick.json" if self.args.quick else "bench.json")).write_text(
            json.dumps(self.results, indent=1))

    def gateway(self, log: str, **env) -> Gateway:
        base = {"LORAPLEX_BASE_MODEL": str(self.base), "LORAPLEX_REGISTRY": str(self.registry_dir),
                "LORAPLEX_STATE_DIR": str(self.work / "state"), "LORAPLEX_ADMIN_TOKEN": ADMIN,
                "LORAPLEX_LOG_LEVEL": "warning", "LORAPLEX_MAX_IN_FLIGHT_PER_ENGINE": "4096"}
        print(f"starting gateway {log} {env}", flush=True)
        return Gateway({**base, **env}, self.work / f"{log}.log")

    @staticmethod
    def counters(gw: Gateway) -> dict:
        """Adapter loads of the gateway's engine, from its resolver's counts: every load asks it; a fetch is a load
        whose files were not in the engine's cache."""
        text = httpx.get(f"{gw.url}/metrics/engine/0", headers={"Authorization": f"Bearer {ADMIN}"}).text

        def total(result):
            return sum(float(v) for v in re.findall(
                rf'^loraplex_engine_adapter_resolves_total{{result="{result}"}} (\S+)$', text, re.M))

        return {"loads": total("cached") + total("fetched"), "fetches": total("fetched")}

    def setup(self) -> None:
        self.base = Path(self.args.base_model).resolve()
        if not (self.base / "config.json").exists():
            print(f"building {self.base} (bench preset, {self.args.model_steps} steps)", flush=True)
            subprocess.run([LOADER, "demo-model", "--preset", "bench", "--out", str(self.base),
                            "--steps", str(self.args.model_steps)], check=True)
        self.model_name = self.base.name
        info = basemodel.load(str(self.base))
        self.factory = AdapterFactory(self.base, rank=8, targets=ALL_LINEAR)
        self.registry_dir = self.work / "registry"
        registry = DirectoryRegistry(self.registry_dir)
        count = max(self.args.sweep)
        t = time.monotonic()
        self.sources = []
        for i in range(count):
            src = self.factory.write(self.work / "src" / f"bench-{i}", seed=i)
            registry.register(f"bench-{i}", src, base=info, max_rank=64,
                              tenant="bench", origin="bench")
            self.sources.append(src)
        print(f"{count} rank-8 adapters on all 7 projections registered in {time.monotonic() - t:.0f} s", flush=True)

    def names(self, n: int) -> list[str]:
        return [f"bench-{i}" for i in range(n)]

    def overhead(self, gw: Gateway) -> None:
        direct = gw.engine_url()
        relay = BareRelay(direct, ENGINE_KEY, self.work / "bare-relay.log")
        try:
            # Single rounds of the 32-stream pair vary by up to 18% here, against a 3% target: it gets more rounds.
            for name, concurrency, rounds, no_stream, what in (
                    ("overhead", None, self.args.overhead_rounds, False, ""),
                    ("overhead-nonstream", 16, None, True, ", non-streamed at 16 clients"),
                    ("overhead-sequential", 1, None, False, ", one request at a time (no queueing)")):
                print(f"gateway overhead{what}", flush=True)
                side = {"concurrency": concurrency, "cpu_of": gw, "no_stream": no_stream, "relay": relay}
                sides = {"gateway": {"url": gw.url, **side}, "vllm": {"url": direct, **side}}
                if concurrency != 1:  # the floor of the front-end CPU comparison
                    sides["bare relay"] = {"url": relay.url, **side}
                r = self.pair(name, sides, rounds)
                r["throughput_ratio"] = r["gateway"]["output_tokens_per_s"] / r["vllm"]["output_tokens_per_s"]
                for key in ("e2e_p50_ms", "e2e_p99_ms", "ttft_p50_ms"):
                    r["added_" + key.removeprefix("e2e_")] = r["gateway"][key] - r["vllm"][key]
                self.save()
        finally:
            relay.stop()

    def sweeps(self, gw: Gateway) -> None:
        """The defaults and, with the `tuned` part, each hand-set setting, on engines that run side by side."""
        gateways = {DEFAULTS: gw} if "sweep" in self.args.only else {}
        try:
            for tuned in self.args.hand_tuned if "tuned" in self.args.only else ():
                loras, rank = tuned.split(":")
                gateways[f"max-loras {loras}, max-lora-rank {rank}"] = self.gateway(
                    f"max-loras-{loras}-rank-{rank}", LORAPLEX_MAX_LORAS=loras, LORAPLEX_MAX_LORA_RANK=rank,
                    LORAPLEX_STATE_DIR=str(self.work / f"state-{loras}-{rank}"))
            self.sweep(gateways)
        finally:
            for other in gateways.values():
                if other is not gw:
                    other.stop()

    def sweep(self, gateways: dict[str, Gateway]) -> None:
        """Every setting runs each point back to back, in the opposite order at every other point, so that drift
        in the machine's speed (up to 18% within minutes here) hits the settings alike."""
        print(f"adapter-count sweep: {'; '.join(gateways)}", flush=True)
        results = self.results.setdefault("sweep", {})
        for label in gateways:
            results[label] = {}
        for i, n in enumerate(self.args.sweep):
            for label, gw in list(gateways.items())[::1 if i % 2 == 0 else -1]:
                before = self.counters(gw)
                slug = re.sub(r"[^a-z0-9]+", "-", label).strip("-")
                report = self.load(gw.url, f"sweep-{slug}-{n}", self.names(n), plot=(n == max(self.args.sweep)))
                after = self.counters(gw)
                results[label][str(n)] = {"output_tokens_per_s": report["throughput"]["output_tokens_per_s"],
                                          "e2e_p99_ms": report["overall"]["e2e_s"]["p99"] * 1000,
                                          "errors": report["overall"]["errors"], "seconds": self.args.duration,
                                          **{k: after[k] - before[k] for k in after}}
            self.save()

    def naive(self, gw: Gateway) -> None:
        adapters = self.work / "naive-adapters"
        adapters.mkdir()
        for src in self.sources[:64]:
            (adapters / src.name).symlink_to(src)
        port = free_port()
        log = self.work / "naive.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "loadtest.naive_server", "--base", str(self.base),
                                     "--adapters", str(adapters), "--port", str(port)], cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc, log, timeout=600)
            for n in (8, 64):
                print(f"loraplex against naive PEFT, {n} adapters", flush=True)
                r = self.pair(f"naive-{n}", {"loraplex": {"url": gw.url, "adapters": self.names(n)},
                                             "naive": {"url": url, "adapters": self.names(n)}})
                r["throughput_ratio"] = r["loraplex"]["output_tokens_per_s"] / r["naive"]["output_tokens_per_s"]
                self.save()
        finally:
            proc.kill()
            proc.wait()

    def lora_ops(self, gw: Gateway) -> None:
        """The same gateway settings with vLLM's own CPU LoRA ops in the engine instead of loraplex's grouped ones."""
        other = self.gateway("vllm-lora-ops", LORAPLEX_LORA_OPS="vllm", LORAPLEX_STATE_DIR=str(self.work / "state-ops"))
        try:
            print("grouped LoRA ops against vLLM's, 64 adapters", flush=True)
            r = self.pair("lora-ops", {"grouped": {"url": gw.url, "adapters": self.names(64)},
                                       "vllm": {"url": other.url, "adapters": self.names(64)}})
            r["throughput_ratio"] = r["grouped"]["output_tokens_per_s"] / r["vllm"]["output_tokens_per_s"]
            self.save()
        finally:
            other.stop()

    def merged(self, gw: Gateway) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        out = self.work / "merged" / "bench-merged"
        model = AutoModelForCausalLM.from_pretrained(self.base, dtype=torch.float32)
        PeftModel.from_pretrained(model, self.sources[0]).merge_and_unload().save_pretrained(out)
        AutoTokenizer.from_pretrained(self.base).save_pretrained(out)
        m = self.gateway("merged", LORAPLEX_BASE_MODEL=str(out), LORAPLEX_REGISTRY=str(self.work / "empty"),
                         LORAPLEX_STATE_DIR=str(self.work / "state-merged"))
        try:
            print("merged-weight ceiling", flush=True)
            r = self.pair("merged", {"lora": {"url": gw.url, "adapters": ["bench-0"]},
                                     "merged": {"url": m.url, "model": "bench-merged"}})
            r["throughput_ratio"] = r["lora"]["output_tokens_per_s"] / r["merged"]["output_tokens_per_s"]
            self.save()
        finally:
            m.stop()

    def first_token(self, gw: Gateway, name: str) -> float:
        start = time.perf_counter()
        with httpx.stream("POST", f"{gw.url}/v1/completions", timeout=60, json={
                "prompt": "Ada and", "max_tokens": 4, "adapter": name, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: {") and '"choices":[{' in line:
                    return time.perf_counter() - start
        raise RuntimeError("no token")

    def cold_start(self, gw: Gateway) -> None:
        print("cold start", flush=True)
        rows = []
        for i in range(self.args.cold_repeats):
            src = self.factory.write(self.work / "src" / f"cold-{i}", seed=100_000 + i)
            t0 = time.perf_counter()
            subprocess.run([LOADER, "adapters", "add", f"cold-cli-{i}", str(src)], env=gw.env, check=True,
                           capture_output=True)
            registered = time.perf_counter() - t0
            rows.append({"via": "cli", "register_s": registered,
                         "first_token_s": self.first_token(gw, f"cold-cli-{i}")})
            data = pack_archive(src)
            t0 = time.perf_counter()
            r = httpx.post(f"{gw.url}/admin/adapters", headers={"Authorization": f"Bearer {ADMIN}"},
                           data={"name": f"cold-up-{i}", "tenant": "bench"}, files={"file": ("a.tgz", data)},
                           timeout=60)
            assert r.status_code == 201, r.text
            rows.append({"via": "upload", "register_s": time.perf_counter() - t0,
                         "first_token_s": self.first_token(gw, f"cold-up-{i}")})
        summary = {}
        for via in ("cli", "upload"):
            mine = [r for r in rows if r["via"] == via]
            summary[via] = {k: statistics.median(r[k] for r in mine) for k in ("register_s", "first_token_s")}
            summary[via]["total_s"] = statistics.median(r["register_s"] + r["first_token_s"] for r in mine)
        self.results["cold_start"] = {"runs": rows, "median": summary}
        self.save()

    def s3_cold_start(self) -> None:
        """A version uploaded into an object-store registry, never seen by the engine, to its first token: the
        engine's resolver fetches it from the store, verifies it and loads it."""
        print("cold start from S3", flush=True)
        store = ObjectStore(self.work / "s3", self.work / "weed.log")
        try:
            boto3.client("s3", endpoint_url=store.endpoint, region_name=store.env["AWS_REGION"],
                         aws_access_key_id=store.env["AWS_ACCESS_KEY_ID"],
                         aws_secret_access_key=store.env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="bench")
            gw = self.gateway("s3", LORAPLEX_REGISTRY="s3://bench/adapters", **store.env)
            try:
                rows = []
                for i in range(self.args.cold_repeats):
                    src = self.factory.write(self.work / "src" / f"s3-cold-{i}", seed=200_000 + i)
                    r = httpx.post(f"{gw.url}/admin/adapters", headers={"Authorization": f"Bearer {ADMIN}"},
                                   data={"name": f"s3-cold-{i}", "tenant": "bench"},
                                   files={"file": ("a.tgz", pack_archive(src))}, timeout=60)
                    assert r.status_code == 201, r.text
                    rows.append(self.first_token(gw, f"s3-cold-{i}"))
                self.results["s3_cold_start"] = {"first_token_s": rows, "median_s": statistics.median(rows)}
                self.save()
            finally:
                gw.stop()
        finally:
            store.stop()

    def routing(self) -> None:
        print("routing over simulated engines", flush=True)
        args = routing_bench.parse([])
        self.results["routing"] = {"args": vars(args), "rows": routing_bench.run(args)}
        self.save()

    def run(self) -> None:
        self.setup()
        parts = self.args.only
        if "routing" in parts:
            self.routing()
        if "s3-cold" in parts:
            self.s3_cold_start()
        if not set(parts) - {"routing", "s3-cold"}:
            return
        gw = self.gateway("defaults")
        try:
            for part, fn in (("overhead", self.overhead), ("sweep", self.sweeps), ("cold", self.cold_start),
                             ("naive", self.naive), ("lora-ops", self.lora_ops), ("merged", self.merged)):
                if part in parts or (part == "sweep" and "tuned" in parts):
                    fn(gw)
        finally:
            gw.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the overhead pair and one small sweep point")
    p.add_argument("--base-model", default="models/bench-base")
    p.add_argument("--model-steps", type=int, default=20,
                   help="training steps when the bench model must be built (speed does not depend on them)")
    p.add_argument("--duration", type=float, default=30, help="seconds per load run")
    p.add_argument("--warmup", type=float, default=5, help="seconds of each run left out")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per pair")
    p.add_argument("--overhead-rounds", type=int, default=4, help="alternating rounds of the 32-stream gateway pair")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--sweep", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--hand-tuned", type=lambda s: s.split(","), default=["8:16"],
                   help="hand-set engine settings to sweep too, as MAX_LORAS:MAX_LORA_RANK pairs")
    p.add_argument("--cold-repeats", type=int, default=3)
    p.add_argument("--only", type=lambda s: s.split(","), default=None,
                   help=f"parts to run ({','.join(PARTS)}), kept with earlier results")
    args = p.parse_args()
    if args.only is None:
        args.only = ["overhead", "sweep"] if args.quick else PARTS
    if args.sweep is None:
        args.sweep = [8] if args.quick else [1, 8, 64, 512, 2000]
    if args.quick:
        args.duration, args.rounds = min(args.duration, 20), min(args.rounds, 2)
        args.overhead_rounds = min(args.overhead_rounds, 2)
    work = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    bench = Bench(args, work)
    try:
        bench.run()
    finally:
        shutil.rmtree(work, ignore_errors=True)  # 2,000 adapters' sources and registry: about 10 GB
    from loadtest.report import write

    write(bench.results, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
