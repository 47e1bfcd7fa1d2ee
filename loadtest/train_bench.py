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

OURS = """
import json, resource, sys
from server.trainer.job import load_job
from server.trainer.train import train
job = load_job(sys.argv[1], ["max_steps=" + sys.argv[2], "output_dir=" + sys.argv[3]])
_, _, facts = train(job, resume=False, log=lambda *a: None)
print(json.dumps({"tokens_per_second": facts["tokens_per_second"], "runtime_s": facts["runtime_s"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

# A plain TRL QLoRA script, as its documentation writes one, on the rows our curation kept (argv[4]), so both
# sides train on the same sequences in the same order: nothing of ours runs in it.
PLAIN = """
import json, resource, sys
import torch, yaml
from pathlib import Path
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

job_path = Path(sys.argv[1])
job = yaml.safe_load(job_path.read_text())
root = job_path.parent
base = str(root / job["base_model"]) if (root / job["base_model"]).exists() else job["base_model"]
rows = [json.loads(line) for line in open(sys.argv[4])]
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=torch.float32)
lora = job.get("lora", {})
args = SFTConfig(output_dir=sys.argv[3], max_steps=int(sys.argv[2]), per_device_train_batch_size=job["batch_size"],
                 learning_rate=job["learning_rate"], lr_scheduler_type="cosine", warmup_steps=0.03,
                 max_length=job["max_seq_len"], completion_only_loss=True, seed=job.get("seed", 0),
                 save_steps=job.get("save_steps", 50), report_to=[], use_cpu=True, logging_steps=10,
                 bf16=False)  # TRL defaults to bf16 autocast, 5x slower on this CPU; same precision as ours
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                     processing_class=AutoTokenizer.from_pretrained(base),
                     peft_config=LoraConfig(r=lora.get("r", 16), lora_alpha=lora.get("alpha", 32),
                                            lora_dropout=lora.get("dropout", 0.05),
                                            target_modules=lora.get("target_modules", "all-linear"),
                                            task_type="CAUSAL_LM"))
runtime = trainer.train().metrics["train_runtime"]
tokens = max(h.get("num_tokens", 0) for h in trainer.state.log_history)
print(json.dumps({"tokens_per_second": tokens / runtime, "runtime_s": runtime,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def curated_rows(job_path: str) -> str:
    """Writes the rows `loraplex train` trains on, in TRL's format, for the plain side."""
    from transformers import AutoTokenizer

    from server.trainer.data import load
    from server.trainer.evaluate import count_tokens
    from server.trainer.job import load_job
    from server.trainer.train import sft_rows

    job = load_job(job_path)
    data = load(job.data, count_tokens(AutoTokenizer.from_pretrained(job.base_model)), job.max_seq_len,
                job.near_duplicate_threshold, job.eval_fraction, log=lambda *a: None)
    fd, path = tempfile.mkstemp(suffix=".jsonl")
    with open(fd, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in sft_rows(data.train))
    return path


def run_side(code: str, job: str, steps: int, rows: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-c", code, job, str(steps), out, rows], capture_output=True,
                              text=True, check=False)
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
            r = run_side(OURS if side == "ours" else PLAIN, args.job, args.steps, rows)
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
