"""The two sides of the training benchmark, each run in a process of its own by loadtest/train_bench.py:

    python -m loadtest.train_sides ours|plain JOB.yaml STEPS OUTPUT_DIR ROWS.jsonl

`ours` is `loraplex train`'s training step; `plain` is a TRL QLoRA script as TRL's documentation writes one, on the
rows our curation kept (ROWS), so both sides train on the same sequences in the same order and nothing of ours runs
in it. Each prints one JSON line: tokens per second, runtime and peak RSS.
"""

import json
import resource
import sys
from pathlib import Path


def ours(job_file: str, steps: int, out: str) -> dict:
    from server.trainer.job import load_job
    from server.trainer.train import train

    job = load_job(job_file, [f"max_steps={steps}", f"output_dir={out}"])
    _, _, facts = train(job, resume=False, log=lambda *a: None)
    return {"tokens_per_second": facts["tokens_per_second"], "runtime_s": facts["runtime_s"]}


def plain(job_file: str, steps: int, out: str, rows_file: str) -> dict:
    import torch
    import yaml
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    job_path = Path(job_file)
    job = yaml.safe_load(job_path.read_text())
    base = str(job_path.parent / job["base_model"]) if (job_path.parent / job["base_model"]).exists() \
        else job["base_model"]
    rows = [json.loads(line) for line in open(rows_file)]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=torch.float32)
    lora = job.get("lora", {})
    args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=job["batch_size"],
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
    return {"tokens_per_second": tokens / runtime, "runtime_s": runtime}


def main(argv: list[str]) -> None:
    side, job, steps, out, rows = argv[0], argv[1], int(argv[2]), argv[3], argv[4]
    result = ours(job, steps, out) if side == "ours" else plain(job, steps, out, rows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({**result, "peak_rss_mb": peak}))


if __name__ == "__main__":
    main(sys.argv[1:])
