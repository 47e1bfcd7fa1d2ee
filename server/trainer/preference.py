"""Preference training: TRL's DPOTrainer on pairs from an export (chosen: a caller's correction, rejected: the answer
given), starting from the version that gave the rejected answers, which is also the reference it is measured
against (TRL copies the starting adapter into a frozen `ref` adapter)."""

import json
from collections.abc import Callable
from pathlib import Path

from server.core.examples import DataError
from server.trainer import data as datamod
from server.trainer.job import Job
from server.trainer.model import count_tokens, load_training_model, release_gpu_memory

Log = Callable[[str], object]


def read_pairs(paths: list[Path]) -> list[dict]:
    """Pairs in TRL's form (conversational for chats, plain for completions); a bad row stops it, named file:line."""
    pairs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    pairs.append(_pair(line, f"{path}:{n}"))
    if not pairs:
        raise DataError(f"{', '.join(map(str, paths))}: no preference pairs")
    return pairs


def _pair(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("chosen", "rejected")):
        raise DataError(f"{where}: a pair needs 'prompt', and 'chosen' and 'rejected' strings")
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return {"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]}
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                               for m in prompt):
        raise DataError(f"{where}: 'prompt' must be a text or a list of messages with text content")
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def dpo_config(job: Job) -> "DPOConfig":
    import torch
    from trl import DPOConfig

    cuda = torch.cuda.is_available()
    return DPOConfig(output_dir=str(job.output_dir / "checkpoints"), num_train_epochs=job.epochs or 1,
                     max_steps=job.max_steps or -1, per_device_train_batch_size=job.batch_size,
                     gradient_accumulation_steps=job.gradient_accumulation, learning_rate=job.learning_rate,
                     beta=job.dpo_beta, max_length=job.max_seq_len, seed=job.seed, data_seed=job.seed,
                     save_steps=job.save_steps, save_total_limit=2, logging_steps=10, report_to=[],
                     use_cpu=not cuda, bf16=cuda)


def train_dpo(job: Job, start_dir: Path, log: Log = print) -> tuple[Path, datamod.Dataset, dict]:
    """Trains from the adapter in `start_dir` on the job's pairs; returns the adapter's directory, the curated
    evaluation data, and the training facts for the manifest."""
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(job.base_model)
    data = datamod.load(job.data, count_tokens(tokenizer), job.max_seq_len, job.near_duplicate_threshold,
                        job.eval_fraction, log)
    pairs = read_pairs(job.pairs)
    log(f"data: {'preference pairs':<24} {len(pairs):>7} rows")
    model = PeftModel.from_pretrained(load_training_model(job), start_dir, is_trainable=True)
    trainer = DPOTrainer(model=model, args=dpo_config(job), train_dataset=Dataset.from_list(pairs),
                         processing_class=tokenizer)
    result = trainer.train()
    adapter_dir = job.output_dir / "adapter"
    trainer.model.save_pretrained(str(adapter_dir), selected_adapters=["default"])
    facts = {"method": "dpo", "start_from": job.start_from, "steps": trainer.state.global_step,
             "train_loss": result.training_loss, "runtime_s": result.metrics.get("train_runtime", 0.0),
             "pairs": len(pairs), "data": {"files": data.files, "counts": data.counts}}
    del trainer, model
    release_gpu_memory()  # the evaluation engine that follows needs it
    return adapter_dir, data, facts
