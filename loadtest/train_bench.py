"""Training throughput and peak memory: `loraplex train` against a plain TRL SFTTrainer script.

Both sides train the same model on the same data with the same QLoRA settings, each in a fresh process,
in alternating rounds so that machine noise hits both alike. Prints tokens/s, peak RSS and the ratios.

    python loadtest/train_bench.py [--job examples/demo-support/job.yaml] [--steps 40] [--rounds 3]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

def curated_rows(job_path: str) -> str:
    """Writes the rows `loraplex train` trains on, in TRL's format, for the plain side."""
    from transformers import AutoTokenizer

    from server.trainer.data import load
    from server.trainer.job import load_job
    from server.trainer.model import count_tokens
    from server.trainer.train import sft_rows

    job = load_job(job_path)
    data = load(job.data, count_tokens(AutoTokenizer.from_pretrained(job.base_model)), job.max_seq_len,
                job.near_duplicate_threshold, job.eval_fraction, log=lambda *a: None)
    fd, path = tempfile.mkstemp(suffix=".jsonl")
    with open(fd, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in sft_rows(data.train))
    return path


def run_side(side: str, job: str, steps: int, rows: str) -> dict:
    """Trains one side (loadtest/train_sides.py) in a fresh process, so peak memory is its own."""
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-m", "loadtest.train_sides", side, job, str(steps), out, rows],
                              capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default="examples/demo-support/job.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    rows = curated_rows(args.job)
    results = {"ours": [], "plain": []}
    for i in range(args.rounds):
        order = ("ours", "plain") if i % 2 == 0 else ("plain", "ours")
        for side in order:
            r = run_side(side, args.job, args.steps, rows)
            results[side].append(r)
            print(f"round {i + 1} {side:<5} {r['tokens_per_second']:8.1f} tok/s  peak {r['peak_rss_mb']:7.1f} MB",
                  flush=True)
    med = {side: {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_second", "peak_rss_mb")}
           for side, runs in results.items()}
    speed = med["ours"]["tokens_per_second"] / med["plain"]["tokens_per_second"]
    memory = med["ours"]["peak_rss_mb"] / med["plain"]["peak_rss_mb"]
    print(f"median tokens/s: loraplex {med['ours']['tokens_per_second']:.1f}, "
          f"plain TRL {med['plain']['tokens_per_second']:.1f}, ratio {speed:.3f} (target >= 0.95)")
    print(f"median peak RSS: loraplex {med['ours']['peak_rss_mb']:.0f} MB, "
          f"plain TRL {med['plain']['peak_rss_mb']:.0f} MB, ratio {memory:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": results, "median": med, "speed_ratio": speed, "memory_ratio": memory}, f, indent=2)


if __name__ == "__main__":
    main()
