"""The load generator's pure parts: adapter popularity, percentiles, the summary of samples."""

from types import SimpleNamespace

from loadtest.workload import BASE, Workload, markdown, parser, percentiles, summarize, zipf_weights


def test_zipf_weights():
    assert zipf_weights(3, 0) == [1, 1, 1]
    w = zipf_weights(4, 1.0)
    assert w == [1, 1 / 2, 1 / 3, 1 / 4]


def test_percentiles_are_exact():
    p = percentiles([i / 1000 for i in range(1, 1001)])
    assert p["p50"] == 0.5 or abs(p["p50"] - 0.5) < 0.0011
    assert abs(p["p99"] - 0.99) < 0.0011 and p["mean"] == sum(i / 1000 for i in range(1, 1001)) / 1000
    assert percentiles([])["p50"] is None


def test_zipf_mix_follows_popularity():
    args = parser().parse_args(["--url", "x", "--adapters", "a,b,c,d", "--zipf", "1.0"])
    w = Workload(args)
    counts = {}
    for _ in range(20000):
        name, body = w.body()
        counts[name] = counts.get(name, 0) + 1
        assert body["adapter"] == name and body["max_tokens"] == 32 and body["stream"]
    # Expected shares 0.48, 0.24, 0.16, 0.12.
    assert 0.45 < counts["a"] / 20000 < 0.51 and 0.10 < counts["d"] / 20000 < 0.14


def test_base_only_sends_no_adapter_and_model_field_for_vllm():
    w = Workload(parser().parse_args(["--url", "x"]))
    name, body = w.body()
    assert name == BASE and "adapter" not in body
    w = Workload(parser().parse_args(["--url", "x", "--adapters", "a@1", "--adapter-field", "model"]))
    assert w.body()[1]["model"] == "a@1"


def test_summary_leaves_out_warmup_and_counts_errors():
    args = parser().parse_args(["--url", "x", "--adapters", "a,b", "--warmup", "1"])
    w = Workload(args)
    w.samples = [
        {"adapter": "a", "start": 0.0, "end": 0.5, "error": None, "tokens": 32, "ttft": 0.1, "e2e": 0.5, "itl": 0.01},
        {"adapter": "a", "start": 1.0, "end": 2.0, "error": None, "tokens": 32, "ttft": 0.2, "e2e": 1.0, "itl": 0.02},
        {"adapter": "b", "start": 1.5, "end": 3.0, "error": None, "tokens": 32, "ttft": 0.3, "e2e": 1.5, "itl": 0.03},
        {"adapter": "b", "start": 2.0, "end": 2.1, "error": "HTTP 429", "tokens": 0},
    ]
    r = summarize(args, w, 3.0, SimpleNamespace(stats=SimpleNamespace(total=SimpleNamespace(num_failures=1))))
    assert r["overall"]["requests"] == 3 and r["overall"]["errors"] == 1 and r["errors"] == {"HTTP 429": 1}
    assert r["window_s"] == 2.0 and r["throughput"]["output_tokens_per_s"] == 32.0
    assert r["per_adapter"]["a"]["e2e_s"]["p50"] == 1.0
    assert "| all | 3 | 1 |" in markdown(r)
