"""Writes the benchmark results as Markdown tables into BENCHMARKS.md, between its `bench:` markers."""

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pair(rows: dict, sides: list[str]) -> list[str]:
    out = ["| side | output tok/s (median) | per round | req/s | TTFT p50 ms | E2E p50 ms | E2E p99 ms | errors |",
           "|---|---|---|---|---|---|---|---|"]
    for side in sides:
        r = rows[side]
        out.append(f"| {side} | {r['output_tokens_per_s']:.1f} | {r['rounds_tok_s']} | {r['requests_per_s']:.2f} "
                   f"| {r['ttft_p50_ms']:.1f} | {r['e2e_p50_ms']:.1f} | {r['e2e_p99_ms']:.1f} | {r['errors']} |")
    return out


def _overhead(results: dict) -> list[str]:
    if "overhead" not in results:
        return []
    o = results["overhead"]
    lines = ["### Gateway overhead (base model)", "", *_pair(o, ["gateway", "vllm"]), "",
             f"Throughput ratio gateway / vLLM: **{o['throughput_ratio']:.3f}** (target ≥ 0.97). "
             f"Added latency: p50 {o['added_p50_ms']:+.1f} ms (target ≤ 2 ms), p99 {o['added_p99_ms']:+.1f} ms, "
             f"TTFT p50 {o['added_ttft_p50_ms']:+.1f} ms.", ""]
    if "gateway_cpu_ms_per_request" in o["gateway"]:
        lines += [f"Gateway process CPU per request: {o['gateway']['gateway_cpu_ms_per_request']:.1f} ms "
                  f"(idle while vLLM is called directly: {o['vllm']['gateway_cpu_ms_per_request']:.1f} ms). On 2 "
                  "cores shared with the engine and the load generator, that CPU time is taken from the engine.", ""]
    return lines


def _sequential(results: dict) -> list[str]:
    if "overhead-sequential" not in results:
        return []
    o = results["overhead-sequential"]
    return ["### Gateway overhead, one request at a time (base model)", "", *_pair(o, ["gateway", "vllm"]), "",
            f"Added latency without queueing: p50 {o['added_p50_ms']:+.2f} ms, p99 {o['added_p99_ms']:+.2f} ms, "
            f"TTFT p50 {o['added_ttft_p50_ms']:+.2f} ms; throughput ratio {o['throughput_ratio']:.3f}.", ""]


def _naive(results: dict) -> list[str]:
    lines = []
    for n in (8, 64):
        if f"naive-{n}" in results:
            r = results[f"naive-{n}"]
            lines += [f"### loraplex against a naive PEFT server, {n} adapters (Zipf)", "",
                      *_pair(r, ["loraplex", "naive"]), "",
                      f"Throughput ratio: **{r['throughput_ratio']:.2f}x** (target ≥ 3x at 64 adapters).", ""]
    return lines


def _lora_ops(results: dict) -> list[str]:
    if "lora-ops" not in results:
        return []
    r = results["lora-ops"]
    return ["### loraplex's grouped LoRA ops against vLLM's own, 64 adapters (Zipf)", "",
            *_pair(r, ["grouped", "vllm"]), "",
            f"Throughput ratio grouped / vLLM's ops: **{r['throughput_ratio']:.2f}x** (same gateway settings; "
            "`LORAPLEX_LORA_OPS=vllm` on the second).", ""]


def _count(value: float | None) -> str:
    """A count, or a dash where the run predates it (sweeps before engines fetched adapters themselves)."""
    return "—" if value is None else f"{value:.0f}"


def _sweep(results: dict) -> list[str]:
    if "sweep" not in results:
        return []
    lines = ["### Adapter-count sweep (Zipf s=1)", "",
             "| residency | adapters | output tok/s | E2E p99 ms | errors | adapter loads | cold loads/s | "
             "fetched from the registry |",
             "|---|---|---|---|---|---|---|---|"]
    for label, points in results["sweep"].items():
        for n, p in points.items():
            per_s = f"{p['loads'] / p['seconds']:.1f}" if "seconds" in p else "—"
            lines.append(f"| {label} | {n} | {p['output_tokens_per_s']:.1f} | {p['e2e_p99_ms']:.0f} "
                         f"| {p['errors']} | {p['loads']:.0f} | {per_s} | {_count(p.get('fetches'))} |")
    d = next((v for k, v in results["sweep"].items() if k.startswith("defaults")), {})
    for n, target in (("512", " (target ≥ 0.70)"), ("2000", "")):
        if "1" in d and n in d:
            lines += ["", f"{n} adapters / 1 adapter with the defaults: **"
                          f"{d[n]['output_tokens_per_s'] / d['1']['output_tokens_per_s']:.2f}**{target}."]
    return lines + [""]


def _merged(results: dict) -> list[str]:
    if "merged" not in results:
        return []
    r = results["merged"]
    return ["### Merged-weight ceiling (one adapter)", "", *_pair(r, ["lora", "merged"]), "",
            f"LoRA / merged throughput: **{r['throughput_ratio']:.2f}**.", ""]


def _cold_start(results: dict) -> list[str]:
    if "cold_start" not in results:
        return []
    lines = ["### Cold start: registration to first token (rank 8, all projections)", "",
             "| via | register s (median) | first token s | total s |", "|---|---|---|---|"]
    for via, m in results["cold_start"]["median"].items():
        lines.append(f"| {via} | {m['register_s']:.3f} | {m['first_token_s']:.3f} | {m['total_s']:.3f} |")
    return lines + [""]


def _front_end_cpu(results: dict) -> list[str]:
    """The gateway's CPU per request beside what vLLM's own API server spends on the same request called directly,
    and beside a bare relay's (uvicorn and aiohttp, nothing else), the floor for a Python gateway."""
    rows = [(name, what) for name, what in (("overhead", "streamed, 32 clients"),
                                            ("overhead-nonstream", "non-streamed, 16 clients"))
            if "vllm_api_cpu_ms_per_request" in results.get(name, {}).get("vllm", {})]
    if not rows:
        return []
    lines = ["### Gateway CPU against vLLM's own front end", "",
             "| completions | gateway CPU ms/request | vLLM API server CPU ms/request (called directly) | ratio "
             "| bare relay CPU ms/request | bare relay ratio |", "|---|---|---|---|---|---|"]
    for name, what in rows:
        gateway = results[name]["gateway"]["gateway_cpu_ms_per_request"]
        front = results[name]["vllm"]["vllm_api_cpu_ms_per_request"]
        bare = results[name].get("bare relay", {}).get("relay_cpu_ms_per_request")
        floor = f"{bare:.2f} | {bare / front:.2f}" if bare is not None else "- | -"
        lines.append(f"| {what} | {gateway:.2f} | {front:.2f} | **{gateway / front:.2f}** | {floor} |")
    return lines + ["", "Target: the gateway at most half of vLLM's front end (ratio ≤ 0.5). The bare relay "
                        "(`loadtest/bare_relay.py`) relays the same requests with nothing of the gateway's work.", ""]


def _s3_cold_start(results: dict) -> list[str]:
    if "s3_cold_start" not in results:
        return []
    r = results["s3_cold_start"]
    runs = ", ".join(f"{s:.3f}" for s in r["first_token_s"])
    return ["### Cold start from object storage (rank 8, all projections, SeaweedFS)", "",
            f"A version uploaded into `s3://` and never seen by the engine, to its first streamed token: median "
            f"**{r['median_s']:.3f} s** (runs: {runs}; target < 1 s).", ""]


def _routing(results: dict) -> list[str]:
    if "routing" not in results:
        return []
    from loadtest.routing_bench import table

    args = argparse.Namespace(**results["routing"]["args"])
    return ["### Routing over simulated engines (`loadtest/routing_bench.py`)", "", table(results["routing"]["rows"],
                                                                                         args), ""]


SECTIONS = (_overhead, _front_end_cpu, _sequential, _naive, _lora_ops, _sweep, _merged, _cold_start, _s3_cold_start,
            _routing)


def tables(results: dict) -> str:
    """Every part of the results present, as Markdown, in the order BENCHMARKS.md shows them."""
    return "\n".join(line for section in SECTIONS for line in section(results))


def write(results: dict, quick: bool = False) -> None:
    path = ROOT / "BENCHMARKS.md"
    marker = "quick" if quick else "full"
    text = path.read_text()
    block = f"<!-- bench:{marker}:start -->\n{tables(results)}\n<!-- bench:{marker}:end -->"
    text = re.sub(rf"<!-- bench:{marker}:start -->.*?<!-- bench:{marker}:end -->", lambda _: block, text, flags=re.S)
    path.write_text(text)
    print(tables(results))
