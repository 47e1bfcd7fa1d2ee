"""The training job file: YAML validated by pydantic, with `--set key=value` overrides."""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.registry import NAME_PATTERN, InvalidReference, check_new_name


class JobError(ValueError):
    """The job file cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        try:
            return check_new_name(name)
        except InvalidReference as e:
            raise ValueError(str(e)) from None
    tenant: str = Field("default", pattern=NAME_PATTERN)
    public: bool = False


class LoraSpec(_Strict):
    r: int = Field(16, ge=1, le=512)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class Job(_Strict):
    base_model: str
    data: list[Path] = Field(min_length=1)
    adapter: AdapterSpec
    method: Literal["sft", "dpo"] = Field("sft", description="sft: supervised on `data`; dpo: TRL's DPOTrainer on "
                                                            "`pairs`, from `start_from` (`data` then only evaluates).")
    pairs: list[Path] = Field(default_factory=list, description="Preference pairs (prompt, chosen, rejected) as "
                                                                "`loraplex data export` writes them, for dpo.")
    start_from: str | None = Field(None, description="NAME@VERSION the dpo run starts from and is measured against: "
                                                     "the version that gave the rejected answers.")
    dpo_beta: float = Field(0.1, gt=0, description="DPO's beta: how far the policy may move from start_from.")
    lora: LoraSpec = LoraSpec()
    quantization: Literal["nf4", "none"] = "nf4"
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    max_seq_len: int = Field(512, ge=16)
    packing: bool = False
    seed: int = 0
    eval_fraction: float = Field(0.1, gt=0, lt=0.5)
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1, description="MinHash Jaccard above which rows are one")
    general_eval: Path | None = None
    promote: Literal["never", "auto"] = "never"
    max_forgetting: float = Field(0.05, ge=0, description="Allowed relative rise of general-text perplexity")
    eval_generations: int = Field(32, ge=0, description="Held-out rows scored by greedy generation")
    max_new_tokens: int = Field(64, ge=1)
    save_steps: int = Field(50, ge=1)
    output_dir: Path | None = None

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _length(self):
        if self.epochs is None and self.max_steps is None:
            self.epochs = 3
        return self

    @model_validator(mode="after")
    def _dpo_inputs(self):
        if self.method == "dpo" and (not self.pairs or not self.start_from):
            raise ValueError("pairs and start_from: a dpo job needs preference pairs and the version it starts from")
        if self.method == "sft" and (self.pairs or self.start_from):
            raise ValueError("pairs and start_from: only for method: dpo")
        return self

    def resolve_paths(self, root: Path) -> "Job":
        """Relative paths in a job file are relative to the file, not to where the command runs."""
        def fix(p: Path | None) -> Path | None:
            return p if p is None or p.is_absolute() else root / p

        base = Path(self.base_model)
        return self.model_copy(update={
            "data": [fix(p) for p in self.data],
            "pairs": [fix(p) for p in self.pairs],
            "general_eval": fix(self.general_eval),
            "output_dir": fix(self.output_dir) or root / "runs" / self.adapter.name,
            "base_model": str(root / base) if not base.is_absolute() and (root / base).exists() else self.base_model,
        })


def _set(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise JobError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def load_job(path: Path, overrides: list[str] = ()) -> Job:
    """Reads, overrides and validates a job file; every error names the file and the field."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise JobError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise JobError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(tree, dict):
        raise JobError(f"{path}: the job must be a mapping of keys to values")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobError(f"--set {item!r}: expected key=value")
        _set(tree, key.strip(), value)
    try:
        job = Job.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise JobError(f"{path}: {field}: {err['msg']}") from None
    return job.resolve_paths(path.parent.resolve())
