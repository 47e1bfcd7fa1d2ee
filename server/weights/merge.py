"""An adapter version merged into its base: a standalone model directory, written only once its logits are checked
against base + adapter on probe prompts (PEFT's merge_and_unload, measured before it is trusted)."""

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from server.registry import Registry, Version
from server.registry.validation import WEIGHTS_FILE

Dtype = Literal["float32", "bfloat16"]
# Largest difference of merged logits from base + adapter, relative to the logits' largest magnitude.
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
PROBES = ["The", "How do I reset my password?", "Ada and Chen met at the printer because",
          "Write one short sentence about the sea."]


class MergeError(ValueError):
    """The merge cannot be made or did not verify; the message says why in one line."""


@dataclass(frozen=True)
class MergeReport:
    out: Path
    difference: float
    tolerance: float
    dtype: str


def check_full_precision(base_dir: Path, manifest: dict) -> None:
    """Refuses a base quantized to 4 or 8 bits: merging into bitsandbytes layers changes generations (PEFT warns)."""
    try:
        config = json.loads((base_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise MergeError(f"the base model at {base_dir} has no readable config.json ({e})") from None
    quant = config.get("quantization_config")
    if quant:
        raise MergeError(f"the base model at {base_dir} is quantized ({quant.get('quant_method', 'unknown')}); merge "
                         f"into the full-precision base the manifest names, {manifest.get('base_model')!r}, with "
                         "LORAPLEX_BASE_MODEL")


def merge(registry: Registry, version: Version, base_dir: Path, out: Path, dtype: Dtype = "float32",
          tolerance: float | None = None, log: Callable[[str], None] = print) -> MergeReport:
    """Merges `version` into the base at `base_dir` and writes the model to `out` (which must not exist yet)."""
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"--out {out}: exists and is not an empty directory")
    check_full_precision(base_dir, version.manifest)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".merge-", dir=out.parent))  # beside out: the last step is a rename
    except OSError as e:
        raise MergeError(f"--out {out}: {e.strerror}") from None
    try:
        registry.fetch(version, work)
        model, tokenizer, difference = _merged(base_dir, work, dtype)
        log(f"largest logit difference of the merged model from base + adapter, relative to the logits' scale: "
            f"{difference:.3g} (bound {tolerance:g}, {dtype})")
        if not difference <= tolerance:
            raise MergeError(f"the merged model's logits differ from base + adapter by {difference:.3g} of their "
                             f"scale, above the bound {tolerance:g}; nothing written")
        _write(model, tokenizer, base_dir, work / "model", version, difference, dtype)
        if out.exists():
            out.rmdir()  # empty, checked above
        (work / "model").rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return MergeReport(out, difference, tolerance, dtype)


def _merged(base_dir: Path, adapter_dir: Path, dtype: Dtype) -> tuple[object, object, float]:
    """The merged model in `dtype`, the tokenizer, and the probes' largest relative logit difference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, adapter_dir).eval()
    probes = [tokenizer(text, return_tensors="pt")["input_ids"] for text in PROBES]
    with torch.no_grad():
        expected = [peft(input_ids=ids).logits for ids in probes]
        merged = peft.merge_and_unload().eval()
        for param in merged.parameters():  # weights only: buffers such as RoPE's frequencies keep float32
            param.data = param.data.to(getattr(torch, dtype))
        got = [merged(input_ids=ids).logits.float() for ids in probes]
    scale = max(e.abs().max().item() for e in expected)
    difference = max((g - e).abs().max().item() for g, e in zip(got, expected)) / scale
    return merged, tokenizer, difference


def _write(model, tokenizer, base_dir: Path, staged: Path, version: Version, difference: float, dtype: str) -> None:
    """The model's shards, config, tokenizer, chat template and generation config, and a card naming its parts."""
    model.save_pretrained(staged, safe_serialization=True, max_shard_size="2GB")
    tokenizer.save_pretrained(staged)
    for extra in ("chat_template.jinja", "generation_config.json"):
        if (base_dir / extra).is_file() and not (staged / extra).is_file():
            shutil.copyfile(base_dir / extra, staged / extra)
    manifest = version.manifest
    sha = manifest["files"][WEIGHTS_FILE]["sha256"]
    (staged / "README.md").write_text(
        f"---\nbase_model: {manifest.get('base_model')}\ntags: [loraplex, merged-lora]\n---\n\n"
        f"# {version.key}, merged\n\n"
        f"- base model: {manifest.get('base_model')} (fingerprint {manifest.get('base_fingerprint')})\n"
        f"- adapter: {version.name}, version {version.version}, rank {manifest.get('rank')}\n"
        f"- adapter weights sha256: {sha}\n"
        f"- dtype: {dtype}; largest logit difference from base + adapter on probe prompts, relative to the "
        f"logits' scale: {difference:.3g}\n")
