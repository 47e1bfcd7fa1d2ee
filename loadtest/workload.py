"""What the load generator sends and how it sums up what came back: free of Locust and gevent, so tests
and other tools can import it without patching the standard library."""

import argparse
import random
from pathlib import Path

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
        body = {"model": self.args.model, "prompt": self.rng.choice(self.prompts),
                "max_tokens": self.args.output_tokens, "ignore_eos": True, "temperature": 0}
        if not self.args.no_stream:
            body.update(stream=True, stream_options={"include_usage": True})
        if name != BASE:
            body[self.args.adapter_field] = name
        return name, body


def summarize(args, workload: Workload, elapsed: float, env) -> dict:
    # The figures cover the window after the warm-up: requests that ended in it, and the time from its start
    # to the last end (a request's start may fall before, as on a server that answers one at a time).
    t0 = min((s["start"] for s in workload.samples), default=0)
    begin = t0 + args.warmup
    kept = [s for s in workload.samples if s["end"] >= begin]
    window = max((s["end"] for s in kept), default=begin) - (begin if args.warmup else t0) or 1e-9
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
        "throughput": {"requests_per_s": len(ok) / window,
                       "output_tokens_per_s": sum(s["tokens"] for s in ok) / window},
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
    p.add_argument("--no-stream", action="store_true", help="non-streamed completions (TTFT is then end to end)")
    p.add_argument("--api-key", default="", help="sent as a bearer token (a loraplex key, or an engine's key)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plot", type=Path)
    return p
