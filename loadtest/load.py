"""Load generator for OpenAI-compatible servers, on Locust, with LLM measurements and a Zipf mix of adapters.

Locust runs the users, bounds the run and counts failures; each request streams and records time to first
token (TTFT), inter-token latency (ITL) and end-to-end latency exactly (Locust's own percentiles round).
Closed loop: --concurrency users, each sending its next request when the last one ends. Open loop: --rate
arrivals per second, fixed or Poisson, whatever the server's pace.

    python -m loadtest.load --url http://127.0.0.1:8000 --concurrency 32 --duration 60 \\
        --adapters bench-0,bench-1,bench-2 --zipf 1.0 --json out.json --markdown out.md --plot out.png
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from locust import HttpUser, constant, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402

BASE = "(base)"


def zipf_weights(n: int, s: float) -> list[float]:
    """Popularity of the k-th adapter proportional to 1/k^s (s=0: uniform)."""
    return [1 / (k ** s) for k in range(1, n + 1)]


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    xs = sorted(values)

    def q(p):
        return xs[min(len(xs) - 1, max(0, round(p * (len(xs) - 1))))]

    return {"p50": q(0.50), "p95": q(0.95), "p99": q(0.99), "mean": sum(xs) / len(xs)}


class Workload:
    """What each request asks for: the adapter (Zipf), a prompt of fixed length, and exactly N output tokens."""

    def __init__(self, args):
        self.args = args
        self.names = [a for a in args.adapters.split(",") if a] or [BASE]
        self.weights = zipf_weights(len(self.names), args.zipf)
        self.rng = random.Random(args.seed)
        words = ["support", "ticket", "account", "reset", "password", "invoice", "order", "refund", "the", "a"]
        self.prompts = [" ".join(self.rng.choice(words) for _ in range(args.prompt_words)) for _ in range(64)]
        self.samples: list[dict] = []
        self.arrivals_skipped = 0

    def body(self) -> tuple[str, dict]:
        name = self.rng.choices(self.names, self.weights)[0]
        body = {"model": self.args.model, "prompt": self.rng.choice(self.prompts), "max_tokens": self.args.output_tokens,
                "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        if name != BASE:
            body[self.args.adapter_field] = name
        return name, body


def make_user(workload: Workload):
    class LLMUser(HttpUser):
        wait_time = constant(0)
        host = workload.args.url

        def send(self):
            name, body = workload.body()
            start = time.perf_counter()
            first = None
            tokens = 0
            error = None
            try:
                with self.client.post("/v1/completions", json=body, stream=True, name=name,
                                      catch_response=True, timeout=workload.args.request_timeout) as r:
                    if r.status_code != 200:
                        error = f"HTTP {r.status_code}"
                        r.failure(error)
                    else:
                        for line in r.iter_lines():
                            if not line.startswith(b"data: {"):
                                continue
                            event = json.loads(line[6:])
                            if event.get("choices") and first is None:
                                first = time.perf_counter()
                            if event.get("usage"):
                                tokens = event["usage"]["completion_tokens"]
                        if first is None or tokens == 0:
                            error = "no tokens"
                            r.failure(error)
            except Exception as e:  # a broken connection is a result to count, not a crash
                error = type(e).__name__
            end = time.perf_counter()
            sample = {"adapter": name, "start": start, "end": end, "error": error, "tokens": tokens}
            if error is None:
                sample.update(ttft=first - start, e2e=end - start,
                              itl=(end - first) / (tokens - 1) if tokens > 1 else None)
            workload.samples.append(sample)

        @task
        def closed_loop(self):
            if workload.args.rate:
                self.open_loop()
            else:
                self.send()

        def open_loop(self):
            """One user generates every arrival; each request runs in its own greenlet."""
            args, rng = workload.args, random.Random(args.seed + 1)
            running: set = set()
            next_at = time.perf_counter()
            while True:
                gap = rng.expovariate(args.rate) if args.arrivals == "poisson" else 1 / args.rate
                next_at += gap
                gevent.sleep(max(0.0, next_at - time.perf_counter()))
                if len(running) >= args.max_outstanding:
                    workload.arrivals_skipped += 1  # bounded memory: the server is past saturation
                    continue
                g = gevent.spawn(self.send)
                running.add(g)
                g.link(running.discard)

    return LLMUser


def run(args) -> dict:
    workload = Workload(args)
    user = make_user(workload)
    env = Environment(user_classes=[user], events=events)
    runner = env.create_local_runner()
    users = 1 if args.rate else args.concurrency
    runner.start(users, spawn_rate=users)
    started = time.perf_counter()
    deadline = started + args.duration

    def stop_when_done():
        while time.perf_counter() < deadline:
            if args.requests and len(workload.samples) >= args.requests:
                break
            gevent.sleep(0.1)
        runner.quit()

    gevent.spawn(stop_when_done)
    runner.greenlet.join()
    elapsed = time.perf_counter() - started
    return summarize(args, workload, elapsed, env)


def summarize(args, workload: Workload, elapsed: float, env) -> dict:
    # Warm-up requests (started in the first --warmup seconds) are left out of every figure.
    t0 = min((s["start"] for s in workload.samples), default=0)
    kept = [s for s in workload.samples if s["start"] >= t0 + args.warmup]
    window = max((s["end"] for s in kept), default=t0) - min((s["start"] for s in kept), default=t0) or 1e-9
    ok = [s for s in kept if s["error"] is None]

    def stats(group: list[dict]) -> dict:
        good = [s for s in group if s["error"] is None]
        return {
            "requests": len(group), "errors": len(group) - len(good),
            "ttft_s": percentiles([s["ttft"] for s in good]),
            "itl_s": percentiles([s["itl"] for s in good if s["itl"] is not None]),
            "e2e_s": percentiles([s["e2e"] for s in good]),
        }

    errors: dict[str, int] = {}
    for s in kept:
        if s["error"]:
            errors[s["error"]] = errors.get(s["error"], 0) + 1
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "plot")},
        "elapsed_s": elapsed, "window_s": window,
        "throughput": {"requests_per_s": len(ok) / window, "output_tokens_per_s": sum(s["tokens"] for s in ok) / window},
        "overall": stats(kept), "errors": errors, "arrivals_skipped": workload.arrivals_skipped,
        "per_adapter": {name: stats([s for s in kept if s["adapter"] == name])
                        for name in workload.names if any(s["adapter"] == name for s in kept)},
        "locust_failures": env.stats.total.num_failures,
    }
    report["timeline"] = [(s["start"] - t0, s["end"] - t0, s["adapter"], s["error"] is None) for s in workload.samples]
    return report


def markdown(report: dict, top: int = 10) -> str:
    def ms(x):
        return "" if x is None else f"{x * 1000:.1f}"

    def row(name, st):
        return (f"| {name} | {st['requests']} | {st['errors']} | {ms(st['ttft_s']['p50'])} | {ms(st['ttft_s']['p99'])} "
                f"| {ms(st['itl_s']['p50'])} | {ms(st['itl_s']['p99'])} | {ms(st['e2e_s']['p50'])} "
                f"| {ms(st['e2e_s']['p95'])} | {ms(st['e2e_s']['p99'])} |")

    t = report["throughput"]
    lines = [f"{t['requests_per_s']:.2f} requests/s, {t['output_tokens_per_s']:.1f} output tokens/s, "
             f"errors {report['overall']['errors']} {report['errors'] or ''}", "",
             "| adapter | requests | errors | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | E2E p50 ms "
             "| E2E p95 ms | E2E p99 ms |", "|---|---|---|---|---|---|---|---|---|---|",
             row("all", report["overall"])]
    busiest = sorted(report["per_adapter"].items(), key=lambda kv: -kv[1]["requests"])[:top]
    lines += [row(name, st) for name, st in busiest]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    done = sorted(end for _, end, _, ok in report["timeline"] if ok)
    if done:
        buckets = [0] * (int(done[-1]) + 1)
        for end in done:
            buckets[int(end)] += 1
        a.plot(range(len(buckets)), buckets)
    a.set(xlabel="seconds", ylabel="requests completed per second", title="throughput over time")
    for name, st in sorted(report["per_adapter"].items(), key=lambda kv: -kv[1]["requests"])[:5]:
        lat = sorted(end - start for start, end, n, ok in report["timeline"] if ok and n == name)
        b.plot([x * 1000 for x in lat], [i / len(lat) for i in range(len(lat))], label=name)
    b.set(xlabel="end-to-end latency (ms)", ylabel="fraction of requests", title="latency CDF (busiest adapters)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--model", default="demo-base", help="`model` of every request")
    p.add_argument("--adapters", default="", help="comma-separated adapter names, most popular first")
    p.add_argument("--adapter-field", default="adapter", choices=["adapter", "model"],
                   help="where the adapter goes: loraplex's `adapter`, or `model` for vLLM itself")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of adapter popularity (0: uniform)")
    p.add_argument("--concurrency", type=int, default=32, help="closed loop: users in flight")
    p.add_argument("--rate", type=float, default=0, help="open loop: arrivals per second (0: closed loop)")
    p.add_argument("--arrivals", choices=["fixed", "poisson"], default="poisson")
    p.add_argument("--max-outstanding", type=int, default=1024, help="open loop: most requests in flight")
    p.add_argument("--duration", type=float, default=60, help="seconds, at most")
    p.add_argument("--requests", type=int, default=0, help="stop after this many requests (0: duration only)")
    p.add_argument("--warmup", type=float, default=0, help="seconds of requests left out of the figures")
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--request-timeout", type=float, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plot", type=Path)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    report = run(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(report))
    if args.plot:
        plot(report, args.plot)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
