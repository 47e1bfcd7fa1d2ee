"""Exact composition of LoRA adapters by rank concatenation: A' = [w1 s1 A1; w2 s2 A2; ...], B' = [B1 B2 ...], so
B'A' is the weighted sum of the sources' updates, with no cross terms (PEFT's `cat` combination, scalings folded in).
numpy only: the gateway composes on a request's path and must not wait for torch to import."""

import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.registry.validation import CONFIG_FILE, WEIGHTS_FILE

_PREFIX = "base_model.model."
_SUFFIXES = {"A": ".lora_A.weight", "B": ".lora_B.weight"}


class ComposeError(ValueError):
    """The recipe cannot be composed; the message says why in one line."""


@dataclass(frozen=True)
class Source:
    """One adapter of a recipe: its files, its weight in the sum and how it is named in messages."""

    directory: Path
    weight: float
    label: str


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as float32 arrays; bfloat16, which numpy lacks, is widened bit for bit."""
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = (8 + size + offset for offset in meta["data_offsets"])
        data = np.frombuffer(raw, dtype=np.uint8, count=end - start, offset=start)
        tensors[name] = _as_float32(data, meta["dtype"]).reshape(meta["shape"])
    return tensors


def _as_float32(data: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return data.view(np.float16).astype(np.float32)
    if dtype == "F32":
        return data.view(np.float32).copy()
    raise ComposeError(f"{WEIGHTS_FILE}: dtype {dtype} is not a float")


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module whose name ends with it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scaling(config: dict, module: str, rank: int) -> float:
    """The factor PEFT multiplies B A by for this module: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", config["r"]))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _modules(tensors: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{module: {"A": array, "B": array}} from PEFT's tensor names."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for name, array in tensors.items():
        for kind, suffix in _SUFFIXES.items():
            if name.startswith(_PREFIX) and name.endswith(suffix):
                modules.setdefault(name[len(_PREFIX):-len(suffix)], {})[kind] = array
    return modules


def updates(source: Source) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module: (w s A, B)}: one source's factors with its weight and scaling folded into A."""
    config = json.loads((source.directory / CONFIG_FILE).read_text())
    if config.get("use_dora"):
        raise ComposeError(f"{source.label}: DoRA adapters cannot be composed")
    factors = {}
    for module, pair in _modules(read_tensors(source.directory / WEIGHTS_FILE)).items():
        a, b = pair["A"], pair["B"]
        factors[module] = (source.weight * _scaling(config, module, a.shape[0]) * a, b)
    return factors


def concatenate(sources: Sequence[Source], max_rank: int) -> tuple[dict[str, np.ndarray], dict]:
    """The composed adapter's tensors and config: each module's factors stacked along the rank, modules a source
    lacks padded with zeros (which add nothing), scaling 1 (alpha = r, no rsLoRA)."""
    parts = [updates(s) for s in sources]
    rank = sum(max((a.shape[0] for a, _ in p.values()), default=0) for p in parts)
    if rank > max_rank:
        labels = " + ".join(f"{s.label} (rank {max(a.shape[0] for a, _ in p.values())})"
                            for s, p in zip(sources, parts))
        raise ComposeError(f"the composed rank {rank} = {labels} exceeds MAX_LORA_RANK {max_rank}")
    tensors = {}
    for module in sorted({m for p in parts for m in p}):
        a, b = _stack(module, parts, rank)
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = b
    return tensors, _config(sources, {m.rsplit(".", 1)[-1] for p in parts for m in p}, rank)


def _stack(module: str, parts: list[dict[str, tuple[np.ndarray, np.ndarray]]],
           rank: int) -> tuple[np.ndarray, np.ndarray]:
    """One module's A' and B', each source in its own block of ranks (zeros where it lacks the module)."""
    shapes = next(p[module] for p in parts if module in p)
    a = np.zeros((rank, shapes[0].shape[1]), dtype=np.float32)
    b = np.zeros((shapes[1].shape[0], rank), dtype=np.float32)
    offset = 0
    for part in parts:
        width = max(x.shape[0] for x, _ in part.values())
        if module in part:
            pa, pb = part[module]
            if pa.shape[1] != a.shape[1] or pb.shape[0] != b.shape[0]:
                raise ComposeError(f"{module}: the sources' shapes differ (made for different base models)")
            a[offset:offset + pa.shape[0]] = pa
            b[:, offset:offset + pa.shape[0]] = pb
        offset += width
    return a, b


def _config(sources: Sequence[Source], targets: set[str], rank: int) -> dict:
    first = json.loads((sources[0].directory / CONFIG_FILE).read_text())
    return {"peft_type": "LORA", "task_type": first.get("task_type", "CAUSAL_LM"), "r": rank, "lora_alpha": rank,
            "use_rslora": False, "use_dora": False, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "target_modules": sorted(targets), "base_model_name_or_path": first.get("base_model_name_or_path"),
            "inference_mode": True}


def write(sources: Sequence[Source], out: Path, max_rank: int) -> None:
    """Writes the composed adapter's two files into `out`."""
    from safetensors.numpy import save_file

    tensors, config = concatenate(sources, max_rank)
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
